"""The map between our parameter tree and Hugging Face tensor names, and model assembly.

Our layout keeps heads as their own axes (q_proj [embed, heads, head_dim]) so sharding rules can
name them, and stacks the decoder layers ([L, ...] under `layers/`); HF stores torch Linear
weights as [out, in], one tensor per layer. Each entry below says how to convert one HF tensor to
its slice of ours and back.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from undo_jax.models.config import ModelConfig
from undo_jax.models.decoder import CausalLM


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    path: tuple  # path in nnx.state(model)
    hf_name: str
    shape: tuple[int, ...]  # our shape (of one layer's slice for stacked parameters)
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    layer: int | None = None  # index into the stacked [L, ...] parameter at `path`


def _identity(x):
    return x


def _linear(shape):
    """torch Linear [out, in] <-> ours [in, *out_split]."""
    return (lambda w: w.T.reshape(shape)), (lambda w: w.reshape(shape[0], -1).T)


def _linear_out_first(shape):
    """o_proj: torch [embed, heads*head_dim] <-> ours [heads, head_dim, embed]."""
    return (lambda w: w.T.reshape(shape)), (lambda w: w.reshape(-1, shape[-1]).T)


def _reshape(shape, flat):
    return (lambda w: w.reshape(shape)), (lambda w: w.reshape(flat))


def tensor_specs(config: ModelConfig) -> Iterator[TensorSpec]:
    for spec in _specs(config):
        if spec.path[0] == "layers":
            spec = dataclasses.replace(spec, layer=int(spec.hf_name.split(".")[2]))
        yield spec


def _specs(config: ModelConfig) -> Iterator[TensorSpec]:
    c = config
    d, f, h, kv, hd, v = (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
                          c.head_dim, c.vocab_size)
    yield TensorSpec(("embed_tokens",), "model.embed_tokens.weight", (v, d), _identity, _identity)
    for i in range(c.num_hidden_layers):
        p, n = ("layers",), f"model.layers.{i}."
        for proj, heads in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            shape = (d, heads, hd)
            yield TensorSpec((*p, "self_attn", proj), n + f"self_attn.{proj}.weight", shape, *_linear(shape))
            if c.attention_bias:
                bias = proj[0] + "_bias"
                yield TensorSpec((*p, "self_attn", bias), n + f"self_attn.{proj}.bias", (heads, hd),
                                 *_reshape((heads, hd), (heads * hd,)))
        shape = (h, hd, d)
        yield TensorSpec((*p, "self_attn", "o_proj"), n + "self_attn.o_proj.weight", shape, *_linear_out_first(shape))
        if c.qk_norm:
            for norm in ("q_norm", "k_norm"):
                yield TensorSpec((*p, "self_attn", norm, "weight"), n + f"self_attn.{norm}.weight", (hd,),
                                 _identity, _identity)
        for proj, shape in (("gate_proj", (d, f)), ("up_proj", (d, f)), ("down_proj", (f, d))):
            yield TensorSpec((*p, "mlp", proj), n + f"mlp.{proj}.weight", shape, *_linear(shape))
        # Gemma 3's norms are stored as HF stores them (w, applied as 1 + w), so they map one to one too.
        extra_norms = ("pre_feedforward_layernorm", "post_feedforward_layernorm") if c.is_gemma3 else ()
        for norm in ("input_layernorm", "post_attention_layernorm", *extra_norms):
            yield TensorSpec((*p, norm, "weight"), n + f"{norm}.weight", (d,), _identity, _identity)
    yield TensorSpec(("norm", "weight"), "model.norm.weight", (d,), _identity, _identity)
    if not c.tie_word_embeddings:
        yield TensorSpec(("lm_head",), "lm_head.weight", (d, v), lambda w: w.T, lambda w: w.T)


def _zeros(shape, dtype, sharding):
    if sharding is None:
        return jnp.zeros(shape, dtype)
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def _layer_sharding(stack_sharding):
    """The sharding of one [L, ...] stack's layer: the stack's spec without its leading `layers` entry."""
    spec = tuple(stack_sharding.spec)
    return jax.sharding.NamedSharding(stack_sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack, layer, index):
    return jax.lax.dynamic_update_index_in_dim(stack, layer.astype(stack.dtype), index, 0)


class WeightsError(ValueError):
    """Checkpoint tensors that do not match the model: lists every problem at once."""


def abstract_model(config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32) -> CausalLM:
    return nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))


def assemble(
    config: ModelConfig,
    fetch: Callable[[str], np.ndarray | None],
    available: set[str],
    *,
    where: str,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    mesh=None,
    rules=None,
    ignore: Callable[[str], bool] = lambda name: False,
) -> CausalLM:
    """Build a CausalLM, converting and placing one tensor at a time.

    `fetch(hf_name)` returns a host array (ideally an mmap view). Each tensor is converted,
    cast, and put on its device placement before the next is read, so the host never holds
    a second copy of the model.
    """
    model = abstract_model(config, dtype=dtype, param_dtype=param_dtype)
    graphdef, state = nnx.split(model)
    shardings = None
    if mesh is not None:
        from undo_jax.sharding import param_shardings

        shardings = nnx.to_flat_state(param_shardings(model, mesh, rules))
        # param_shardings keeps the state's Variables (each holding its NamedSharding): unwrap them.
        shardings = {path: s.get_value() if isinstance(s, nnx.Variable) else s for path, s in shardings}
    # One stacked parameter at a time (all its layers together), so the host holds at most one stack.
    specs = sorted(tensor_specs(config), key=lambda s: (s.layer is not None, s.path, s.layer or 0))
    expected = {s.hf_name for s in specs}
    problems = [f"missing tensor {name}" for name in sorted(expected - available)]
    problems += [f"unexpected tensor {name}" for name in sorted(available - expected) if not ignore(name)]
    values = {}
    stacks: dict[tuple, jax.Array] = {}  # stacked params being filled on their devices, one layer at a time
    num_layers = config.num_hidden_layers
    for spec in specs:
        if spec.hf_name not in available:
            continue
        raw = fetch(spec.hf_name)
        try:
            arr = spec.to_ours(raw)
        except ValueError:
            arr = None
        if arr is None or tuple(arr.shape) != spec.shape:
            problems.append(
                f"tensor {spec.hf_name} has shape {tuple(raw.shape)}, expected one convertible to {spec.shape}"
            )
            continue
        if problems:
            continue  # keep validating, stop converting
        arr = np.asarray(arr).astype(jnp.dtype(param_dtype))
        if spec.layer is not None:
            # Written into the placed stack in place (donated): the host holds one layer's tensor at a time.
            sharding = None if shardings is None else shardings[spec.path]
            if spec.path not in stacks:
                stacks[spec.path] = _zeros((num_layers, *spec.shape), arr.dtype, sharding)
            layer = arr if sharding is None else jax.device_put(arr, _layer_sharding(sharding))
            stacks[spec.path] = _set_layer(stacks[spec.path], layer, spec.layer)
            del arr, raw, layer
            if spec.layer == num_layers - 1:
                values[spec.path] = stacks.pop(spec.path)
            continue
        if shardings is not None:
            values[spec.path] = jax.device_put(arr, shardings[spec.path])
        else:
            values[spec.path] = jnp.asarray(arr)
        del arr, raw
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise WeightsError(f"{where}: weights do not match the config ({len(problems)} problems): " + "; ".join(shown))
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        var.set_value(values[path]) if hasattr(var, "set_value") else setattr(var, "value", values[path])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def export_tensors(model: CausalLM, *, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (hf_name, host array) one tensor at a time (gathered from any sharding)."""
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for spec in tensor_specs(model.config):
        value = state[spec.path][...]
        arr = np.asarray(jax.device_get(value if spec.layer is None else value[spec.layer]))
        if dtype is not None:
            arr = arr.astype(dtype)
        yield spec.hf_name, np.ascontiguousarray(spec.to_hf(arr))

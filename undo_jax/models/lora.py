"""LoRA and QLoRA for the stacked-layer decoder: adapters as their own Variable type, quantised frozen bases.

An adapted projection W [*in, *out] gains A [*in, r] and B [r, *out] (flax's `nnx.LoRAParam`, a subclass
of `nnx.Param`), stacked [L, ...] like W and carrying logical axes, so the mesh rules shard them with
their weight. The projection computes x W + (alpha / r) (x A) B, as PEFT's `lora.Linear` does. The
trainer trains only `nnx.LoRAParam` when a model has any (`trainable_filter`); the base stays as it is.

QLoRA stores the frozen projection weights as a `QuantizedWeight` (non-Param variables, so never in the
optimizer): int8 with a per-output-channel absmax scale, or NF4 (QLoRA's 16-level normal-float code,
two codes a byte) with one absmax per block of 64 weights. They are dequantised to the compute dtype at
use, one layer at a time inside the layer scan.

Why not qwix: it finds a projection's weight by intercepting the op and looking the operand up among the
attributes of the module that runs it, and creates LoRA params inside that call. Our layers run as
`nnx.merge`d slices of stacked [L, ...] params under `lax.scan`, with the weights in an `nnx.Dict` and cast
before the einsum: params created there would not survive the scan (BUILD_NOTES, issue 14).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# --lora_targets name -> (decoder layer group, projection) and the number of leading input axes of W.
TARGETS = {
    "q": ("self_attn", "q_proj", 1), "k": ("self_attn", "k_proj", 1), "v": ("self_attn", "v_proj", 1),
    "o": ("self_attn", "o_proj", 2),
    "gate": ("mlp", "gate_proj", 1), "up": ("mlp", "up_proj", 1), "down": ("mlp", "down_proj", 1),
}
BASE_DTYPES = ("float32", "bfloat16", "int8", "nf4")
NF4_BLOCK = 64
# QLoRA's NF4 code (Dettmers et al. 2023, as bitsandbytes): quantiles of N(0, 1) scaled to [-1, 1], exact 0.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
ADAPTER_SUFFIX = "_lora"


class LoRAError(ValueError):
    """LoRA settings that cannot apply to a model (message: one line naming the flag)."""


LoRAParam = nnx.LoRAParam


class QuantizedArray(nnx.Variable):
    """Frozen quantised storage (codes or scales): not an `nnx.Param`, so no optimizer ever sees it."""


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    rank: int
    alpha: float
    targets: tuple[str, ...] = tuple(TARGETS)
    base_dtype: str = "bfloat16"

    def __post_init__(self):
        if self.rank < 0:
            raise LoRAError(f"--lora_rank: must be >= 0, got {self.rank}")
        if self.base_dtype not in BASE_DTYPES:
            raise LoRAError(f"--lora_base_dtype: unknown {self.base_dtype!r}; choose one of {', '.join(BASE_DTYPES)}")
        for t in self.targets:
            if t not in TARGETS:
                raise LoRAError(f"--lora_targets: unknown target {t!r}; choose from {','.join(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets), "base_dtype": self.base_dtype}


def parse_targets(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in str(text).split(",") if t.strip())
    if not names:
        raise LoRAError("--lora_targets: is empty; give a comma list of " + ",".join(TARGETS))
    for t in names:
        if t not in TARGETS:
            raise LoRAError(f"--lora_targets: unknown target {t!r}; choose from {','.join(TARGETS)}")
    return names


# ---------------------------------------------------------------- the projection (decoder call sites)
def weight(group: nnx.Dict, name: str, dtype) -> jax.Array:
    """The dense base weight `name` of a layer group in `dtype` (dequantised when stored quantised)."""
    w = group[name]
    return w.dequantize(dtype) if isinstance(w, QuantizedWeight) else w[...].astype(dtype)


def project(group: nnx.Dict, name: str, spec: str, x: jax.Array, dtype) -> jax.Array:
    """einsum(spec, x, W) for projection `name` of a layer group, plus its LoRA update if it has one."""
    y = jnp.einsum(spec, x, weight(group, name, dtype))
    adapter = group.get(name + ADAPTER_SUFFIX)
    return y if adapter is None else y + adapter(x, dtype)


class LoRAAdapter(nnx.Module):
    """A [*in, r] and B [r, *out] (stacked [L, ...] when built for the layer stack) and the scale alpha / r."""

    def __init__(self, a: jax.Array, b: jax.Array, *, in_axes: int, scale: float, a_axes, b_axes):
        self.a = LoRAParam(a, logical_axes=tuple(a_axes))
        self.b = LoRAParam(b, logical_axes=tuple(b_axes))
        self.in_axes = in_axes
        self.scale = float(scale)

    def __call__(self, x: jax.Array, dtype) -> jax.Array:
        n = self.in_axes
        h = jnp.tensordot(x, self.a[...].astype(dtype), axes=(tuple(range(x.ndim - n, x.ndim)), tuple(range(n))))
        return jnp.tensordot(h, self.b[...].astype(dtype), axes=1) * jnp.asarray(self.scale, dtype)

    def delta(self) -> jax.Array:
        """scale * A B as a weight of W's shape (stacked: [L, *in, *out]), float32."""
        a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
        per_layer = lambda a, b: jnp.tensordot(a, b, axes=1)  # noqa: E731
        ab = jax.vmap(per_layer)(a, b) if a.ndim == self.in_axes + 2 else per_layer(a, b)
        return ab * self.scale


# ---------------------------------------------------------------- quantised frozen weights
class QuantizedWeight(nnx.Module):
    """A frozen weight stored int8 (per-output-channel absmax) or NF4 (blockwise absmax, blocks of 64).

    Built for the stacked layers ([L, ...]); inside the scan a slice holds one layer and dequantises to it.
    """

    def __init__(self, w: jax.Array, *, kind: str, in_axes: int, logical_axes):
        self.kind = kind
        self.shape = tuple(w.shape[1:])  # one layer's weight shape
        w = jnp.asarray(w, jnp.float32)
        if kind == "int8":
            reduce = tuple(range(1, 1 + in_axes))  # the input axes of each layer's [*in, *out]
            absmax = jnp.max(jnp.abs(w), axis=reduce, keepdims=True)
            scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
            self.codes = QuantizedArray(jnp.round(w / scale).astype(jnp.int8), logical_axes=tuple(logical_axes))
            self.scale = QuantizedArray(scale, logical_axes=tuple(logical_axes))
        elif kind == "nf4":
            codes, absmax = jax.lax.map(_nf4_quantize, w)  # layer by layer: bounded temporaries
            self.codes = QuantizedArray(codes, logical_axes=("layers", None, None))
            self.scale = QuantizedArray(absmax, logical_axes=("layers", None))
        else:
            raise LoRAError(f"--lora_base_dtype: {kind!r} is not a quantised dtype (int8, nf4)")

    def dequantize(self, dtype) -> jax.Array:
        codes, scale = self.codes[...], self.scale[...]
        if self.kind == "int8":
            return (codes.astype(jnp.float32) * scale).astype(dtype)
        lead = codes.shape[:-2]  # () inside the layer scan, (L,) for the whole stack
        table = jnp.asarray(NF4_CODE)
        pairs = jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(*codes.shape[:-1], -1)
        values = table[pairs.astype(jnp.int32)] * scale[..., None]
        size = math.prod(self.shape)
        return values.reshape(*lead, -1)[..., :size].reshape(*lead, *self.shape).astype(dtype)


def _nf4_quantize(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One layer's weight -> (uint8 [blocks, 32] two codes a byte, float32 absmax [blocks])."""
    flat = w.reshape(-1)
    flat = jnp.pad(flat, (0, (-flat.size) % NF4_BLOCK)).reshape(-1, NF4_BLOCK)
    absmax = jnp.max(jnp.abs(flat), axis=-1)
    normed = flat / jnp.where(absmax > 0, absmax, 1.0)[:, None]
    table = jnp.asarray(NF4_CODE)
    # Nearest code: the code index is the number of midpoints below the value.
    idx = jnp.searchsorted((table[1:] + table[:-1]) / 2, normed).astype(jnp.uint8)
    pairs = idx.reshape(idx.shape[0], -1, 2)
    return (pairs[..., 0] << 4) | pairs[..., 1], absmax


# ---------------------------------------------------------------- applying LoRA to a model
def _projections(model):
    """(target name, group dict, projection name, in_axes) of every projection of the decoder layers."""
    for target, (group_name, proj, in_axes) in TARGETS.items():
        yield target, group_name, getattr(model.layers, group_name), proj, in_axes


def has_lora(model) -> bool:
    return bool(jax.tree.leaves(nnx.state(model, LoRAParam)))


def trainable_filter(model):
    """What the trainer trains: the adapters of a LoRA model, else every Param."""
    return LoRAParam if has_lora(model) else nnx.Param


def apply_lora(model, settings: LoRASettings, *, seed: int = 0):
    """Add adapters to `settings.targets` and store every projection's base as `settings.base_dtype`, in place.

    A starts as PEFT's default (kaiming-uniform, bound 1/sqrt(fan_in)), B as zeros: the adapted model
    computes exactly what the base does until B moves. Returns the model.
    """
    if settings.rank == 0:
        return model
    if has_lora(model):
        raise LoRAError("--lora_rank: the model already has LoRA adapters")
    key = jax.random.key(seed)
    for i, (target, _, group, proj, in_axes) in enumerate(_projections(model)):
        if proj not in group:
            if target in settings.targets:
                raise LoRAError(f"--lora_targets: this model has no {proj} for target {target!r}")
            continue
        base = group[proj]
        axes = base.get_metadata()["logical_axes"]
        w = base[...]
        if target in settings.targets:
            layers, in_shape, out_shape = w.shape[0], w.shape[1:1 + in_axes], w.shape[1 + in_axes:]
            fan_in = math.prod(in_shape)
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(jax.random.fold_in(key, i), (layers, *in_shape, settings.rank), jnp.float32,
                                   -bound, bound)
            b = jnp.zeros((layers, settings.rank, *out_shape), jnp.float32)
            group[proj + ADAPTER_SUFFIX] = LoRAAdapter(
                a, b, in_axes=in_axes, scale=settings.scale, a_axes=(*axes[:1 + in_axes], None),
                b_axes=(axes[0], None, *axes[1 + in_axes:]))
        if settings.base_dtype in ("int8", "nf4"):
            group[proj] = QuantizedWeight(w, kind=settings.base_dtype, in_axes=in_axes, logical_axes=axes)
        else:
            group[proj] = nnx.Param(w.astype(settings.base_dtype), logical_axes=tuple(axes))
    return model


def lora_settings_of(model) -> LoRASettings | None:
    """The settings a LoRA model was built with (rank, alpha, targets; base dtype from its storage)."""
    found = {}
    for target, _, group, proj, _ in _projections(model):
        adapter = group.get(proj + ADAPTER_SUFFIX)
        if adapter is not None:
            found[target] = adapter
    if not found:
        return None
    first = next(iter(found.values()))
    rank = int(first.a[...].shape[-1])
    base = model.layers.mlp["up_proj"]
    base_dtype = base.kind if isinstance(base, QuantizedWeight) else str(base[...].dtype)
    return LoRASettings(rank=rank, alpha=first.scale * rank, targets=tuple(found), base_dtype=base_dtype)


# ---------------------------------------------------------------- merging and the base's identity
def merged_model(model):
    """A plain CausalLM (no adapters, dense weights in the model's param dtype) with W + scale * A B."""
    from undo_jax.models.decoder import CausalLM

    if not has_lora(model) and not any(isinstance(g[p], QuantizedWeight) for _, _, g, p, _ in _projections(model)):
        return model
    pure = nnx.state(model).to_pure_dict()
    for _, group_name, group, proj, _ in _projections(model):
        dense = weight(group, proj, jnp.float32)
        adapter = group.get(proj + ADAPTER_SUFFIX)
        if adapter is not None:
            dense = dense + adapter.delta()
            del pure["layers"][group_name][proj + ADAPTER_SUFFIX]
        pure["layers"][group_name][proj] = dense.astype(model.param_dtype)
    plain = nnx.eval_shape(lambda: CausalLM(model.config, rngs=nnx.Rngs(0), dtype=model.dtype,
                                            param_dtype=model.param_dtype, attention=model.attention,
                                            scan_layers=model.scan_layers))
    graphdef, _ = nnx.split(plain)
    return nnx.merge(graphdef, pure)


def base_fingerprint(model) -> str:
    """sha256 over path, shape, dtype and float64 sum / abs-sum of every frozen array: a wrong base is caught
    on resume without hashing gigabytes (the sums are computed where the arrays live)."""
    _, frozen = nnx.split(model, trainable_filter(model), ...)[1:]
    flat, _ = jax.tree_util.tree_flatten_with_path(frozen.to_pure_dict())
    sums = jax.jit(lambda xs: [(jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.abs(x.astype(jnp.float32))))
                               for x in xs])([leaf for _, leaf in flat])
    rows = [[jax.tree_util.keystr(path), list(leaf.shape), str(leaf.dtype), float(s), float(a)]
            for (path, leaf), (s, a) in zip(flat, jax.device_get(sums), strict=True)]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()

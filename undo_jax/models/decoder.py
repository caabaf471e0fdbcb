"""Flax NNX causal decoder for the Llama family, Qwen2/2.5, Qwen3 and Gemma 3 (text).

One module covers the families; Llama / Qwen differ only in QKV bias (Qwen2), per-head q/k
RMSNorm (Qwen3), tied embeddings and RoPE scaling (Llama 3). Gemma 3 adds (1 + w) RMSNorms, four
norms per block (a norm after attention and around the MLP), GeGLU with tanh GELU, a sqrt(hidden)
embedding scale, and local layers: a sliding attention window and their own RoPE base. Which layers
are local is a per-layer scanned input (not a Python branch), so the layers stay one stacked
`DecoderLayer` and compile time stays independent of depth. Every parameter carries
`logical_axes` metadata that `undo_jax.sharding` maps onto a device mesh.

The decoder layers are one `DecoderLayer` whose parameters are stacked with a leading `layers`
axis ([L, ...]); they run under `jax.lax.scan` (compile time independent of depth) or, with
`scan_layers=False`, as an unrolled Python loop over the same stacked parameters. Attention goes
through `undo_jax.models.attention.attention` (backend chosen by `attention=`). The KV cache is a
`KVCache` of stacked [L, B, KV, S, Dh] keys and values plus per-row slot positions and validity.

Parameter dtype and compute dtype are separate: weights are cast to `dtype` at use, norms and
softmax run in float32, logits are returned in float32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from undo_jax.models.attention import attention, check_backend
from undo_jax.models.config import ModelConfig
from undo_jax.models.lora import project

_INIT_STD = 0.02
# jax.checkpoint policies by name; "none" = no remat (every activation saved).
REMAT_POLICIES = ("none", "nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable")


def _param(rngs: nnx.Rngs, shape, axes, dtype, *, zeros=False, ones=False, layers: int | None = None) -> nnx.Param:
    if layers is not None:  # stacked over decoder layers: a leading replicated `layers` axis
        shape, axes = (layers, *shape), ("layers", *axes)
    if ones:
        value = jnp.ones(shape, dtype)
    elif zeros:
        value = jnp.zeros(shape, dtype)
    else:
        value = (_INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
    """offset=False: w * x (Llama, Qwen); offset=True: (1 + w) * x with w stored as HF stores it (Gemma)."""

    def __init__(self, dim: int, eps: float, *, axis_name: str | None, param_dtype, rngs: nnx.Rngs,
                 layers: int | None = None, offset: bool = False):
        self.weight = _param(rngs, (dim,), (axis_name,), param_dtype, ones=not offset, zeros=offset, layers=layers)
        self.eps = eps
        self.offset = offset

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        if self.offset:  # Gemma scales in float32 and casts after, as HF does
            return (x * (1.0 + self.weight[...].astype(jnp.float32))).astype(dtype)
        # HF multiplies in the input dtype after the float32 normalisation.
        return self.weight[...].astype(dtype) * x.astype(dtype)


def rope_inv_freq(config: ModelConfig, *, local: bool = False) -> jax.Array:
    """Inverse frequencies of the global layers, including `rope_scaling` (Llama 3's piecewise llama3, or
    linear), or (local=True) of Gemma 3's sliding-window layers: their own base, never scaled."""
    d = config.head_dim
    theta = config.rope_local_theta if local else config.rope_theta
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    scaling = config.rope_scaling
    if scaling is None or local:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        return inv_freq / factor
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, Dh]; HF's rotate-half convention (not interleaved)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class DecoderLayer(nnx.Module):
    """One pre-norm decoder layer; built with `layers=L`, every parameter is stacked [L, ...] and a
    slice of the state (one layer) merged with the same graphdef runs that layer."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs, layers: int | None = None):
        d, f = config.hidden_size, config.intermediate_size
        h, kv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        eps = config.rms_norm_eps

        def param(shape, axes, **kw):
            return _param(rngs, shape, axes, param_dtype, layers=layers, **kw)

        def norm(dim, axis_name):
            return RMSNorm(dim, eps, axis_name=axis_name, param_dtype=param_dtype, rngs=rngs, layers=layers,
                           offset=config.is_gemma3)

        self.input_layernorm = norm(d, "norm")
        self.self_attn = nnx.Dict(
            q_proj=param((d, h, hd), ("embed", "heads", "head_dim")),
            k_proj=param((d, kv, hd), ("embed", "kv_heads", "head_dim")),
            v_proj=param((d, kv, hd), ("embed", "kv_heads", "head_dim")),
            o_proj=param((h, hd, d), ("heads", "head_dim", "embed")),
        )
        if config.attention_bias:
            self.self_attn["q_bias"] = param((h, hd), ("heads", "head_dim"), zeros=True)
            self.self_attn["k_bias"] = param((kv, hd), ("kv_heads", "head_dim"), zeros=True)
            self.self_attn["v_bias"] = param((kv, hd), ("kv_heads", "head_dim"), zeros=True)
        if config.qk_norm:
            self.self_attn["q_norm"] = norm(hd, "head_dim")
            self.self_attn["k_norm"] = norm(hd, "head_dim")
        self.post_attention_layernorm = norm(d, "norm")
        if config.is_gemma3:  # Gemma's sandwich: post_attention_layernorm normalises the attention output
            self.pre_feedforward_layernorm = norm(d, "norm")
            self.post_feedforward_layernorm = norm(d, "norm")
        self.mlp = nnx.Dict(gate_proj=param((d, f), ("embed", "mlp")), up_proj=param((d, f), ("embed", "mlp")),
                            down_proj=param((f, d), ("mlp", "embed")))
        self.has_bias = config.attention_bias
        self.has_qk_norm = config.qk_norm
        self.gemma = config.is_gemma3
        self.dtype = dtype

    def qkv(self, x, cos, sin):
        """x [B, T, D] (already normed) -> q [B, T, H, Dh], k and v [B, KV, T, Dh] (the cache layout)."""
        dt, a = self.dtype, self.self_attn
        q = project(a, "q_proj", "btd,dnh->btnh", x, dt)
        k = project(a, "k_proj", "btd,dnh->btnh", x, dt)
        v = project(a, "v_proj", "btd,dnh->btnh", x, dt)
        if self.has_bias:
            q = q + a["q_bias"][...].astype(dt)
            k = k + a["k_bias"][...].astype(dt)
            v = v + a["v_bias"][...].astype(dt)
        if self.has_qk_norm:
            q, k = a["q_norm"](q), a["k_norm"](k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def finish(self, x, attn):
        """Residual stream after the attention output attn [B, T, H, Dh] and the MLP."""
        out = project(self.self_attn, "o_proj", "btnh,nhd->btd", attn, self.dtype)
        if not self.gemma:
            x = x + out
            return x + self.mlp_out(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(out)
        return x + self.post_feedforward_layernorm(self.mlp_out(self.pre_feedforward_layernorm(x)))

    def mlp_out(self, h):
        """SwiGLU (Llama, Qwen) or GeGLU with tanh GELU (Gemma's gelu_pytorch_tanh)."""
        dt, m = self.dtype, self.mlp
        gate = project(m, "gate_proj", "btd,df->btf", h, dt)
        up = project(m, "up_proj", "btd,df->btf", h, dt)
        act = jax.nn.gelu(gate, approximate=True) if self.gemma else jax.nn.silu(gate)
        return project(m, "down_proj", "btf,fd->btd", act * up, dt)


class KVCache(NamedTuple):
    """Keys/values of every layer in the layout attention reads without a transpose, and per-row slot
    metadata: slot s of row b holds a token iff valid[b, s], at RoPE position positions[b, s].

    k, v [L, B, KV, S, Dh]; positions [B, S] int32; valid [B, S] bool. Rows are independent: a row's
    slots can be reset (valid False) and refilled without touching the others.
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    valid: jax.Array


def default_positions(input_ids, attention_mask=None, segment_ids=None) -> jax.Array:
    b, t = input_ids.shape
    if segment_ids is not None:
        # Position within each packed segment: count of earlier tokens of the same segment.
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        earlier = jnp.tril(jnp.ones((t, t), bool), -1)[None]
        return jnp.sum(same & earlier, axis=-1).astype(jnp.int32)
    if attention_mask is not None:
        return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def remat_policy(name: str):
    if name not in REMAT_POLICIES or name == "none":
        raise ValueError(f"remat policy {name!r} is unknown; choose one of {', '.join(REMAT_POLICIES[1:])}")
    return getattr(jax.checkpoint_policies, name)


class CausalLM(nnx.Module):
    """attention: a backend of `undo_jax.models.attention` (auto | reference | chunked | xla | tpu);
    scan_layers: run the stacked layers under lax.scan (True) or unrolled (False)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention: str = "auto", scan_layers: bool = True):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        self.attention = check_backend(attention)
        self.scan_layers = bool(scan_layers)
        self.embed_tokens = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), param_dtype)
        self.layers = DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                   layers=config.num_hidden_layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, axis_name="norm", param_dtype=param_dtype,
                            rngs=rngs, offset=config.is_gemma3)
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), param_dtype)

    def embed(self, input_ids):
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)
        if self.config.is_gemma3:  # HF rounds the sqrt(hidden) scale to the weights' dtype first
            x = x * jnp.asarray(math.sqrt(self.config.hidden_size), self.dtype)
        return x

    # ---- per-layer differences (Gemma 3's local layers), as scanned inputs ----
    def _layer_xs(self):
        """Per-layer scanned inputs: the layer index and whether the layer is local (sliding window)."""
        c = self.config
        return {"index": jnp.arange(c.num_hidden_layers, dtype=jnp.int32),
                "local": jnp.asarray(c.local_layers, bool)}

    def _rope(self, positions):
        """cos/sin of the global layers and, with local layers, of the local ones: ((cos, sin), local or None)."""
        cos_sin = rope_cos_sin(positions, rope_inv_freq(self.config))
        if not any(self.config.local_layers):
            return cos_sin, None
        return cos_sin, rope_cos_sin(positions, rope_inv_freq(self.config, local=True))

    def _layer_rope(self, rope, xs):
        """The cos/sin layer `xs` uses (a select on the scanned flag, not a Python branch)."""
        (cos, sin), local = rope
        if local is None:
            return cos, sin
        return jnp.where(xs["local"], local[0], cos), jnp.where(xs["local"], local[1], sin)

    def _window(self, xs) -> dict:
        """Attention scale and sliding window of layer `xs` (the window only on local layers)."""
        c = self.config
        if not any(c.local_layers):
            return {"scale": c.attention_scale}
        return {"scale": c.attention_scale, "sliding_window": c.sliding_window, "window_active": xs["local"]}

    def _run_layers(self, body, carry, xs=None, *, remat: bool | str = False):
        """carry, ys = scan of body(carry, layer, x) over the stacked layers (xs: per-layer inputs, [L, ...])."""
        graphdef, state = nnx.split(self.layers)

        def step(carry, inputs):
            layer_state, x = inputs
            return body(carry, nnx.merge(graphdef, layer_state), x)

        if remat:
            policy = remat_policy("nothing_saveable" if remat is True else remat)
            # Unrolled layers need prevent_cse, or XLA merges the recomputation back into the forward pass.
            step = jax.checkpoint(step, policy=policy, prevent_cse=not self.scan_layers)
        if self.scan_layers:
            return jax.lax.scan(step, carry, (state, xs))
        ys = []
        for i in range(self.config.num_hidden_layers):
            carry, y = step(carry, jax.tree.map(lambda a, i=i: a[i], (state, xs)))
            ys.append(y)
        return carry, (None if ys[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *ys))

    def _attend(self, q, k, v, **kw):
        return attention(q, k, v, backend=self.attention, **kw)

    def hidden_states(self, input_ids, *, attention_mask=None, positions=None, segment_ids=None,
                      remat: bool | str = False):
        """Final-norm hidden states [B, T, D]. remat: False, True (nothing_saveable) or a policy name."""
        if positions is None:
            positions = default_positions(input_ids, attention_mask, segment_ids)
        valid = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
        if segment_ids is not None:
            valid = valid & (segment_ids > 0)
        rope = self._rope(positions)

        def body(x, layer, xs):
            q, k, v = layer.qkv(layer.input_layernorm(x), *self._layer_rope(rope, xs))
            out = self._attend(q, k, v, q_positions=positions, kv_positions=positions, kv_valid=valid,
                               q_segment_ids=segment_ids, kv_segment_ids=segment_ids, **self._window(xs))
            return layer.finish(x, out), None

        x, _ = self._run_layers(body, self.embed(input_ids), self._layer_xs(),
                                remat=remat if remat != "none" else False)
        return self.norm(x)

    def logits_from_hidden(self, h):
        if self.config.tie_word_embeddings:
            w = self.embed_tokens[...].astype(self.dtype)
            logits = jnp.einsum("...d,vd->...v", h, w, preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("...d,dv->...v", h, self.lm_head[...].astype(self.dtype),
                                preferred_element_type=jnp.float32)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else jnp.tanh(logits / cap) * cap

    def __call__(self, input_ids, *, attention_mask=None, positions=None, segment_ids=None):
        h = self.hidden_states(input_ids, attention_mask=attention_mask, positions=positions, segment_ids=segment_ids)
        return self.logits_from_hidden(h)

    # ---- KV-cache decoding (used by undo_jax.sampling) ----
    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        c = self.config
        shape = (c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim)
        dt = dtype or self.dtype
        return KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt), jnp.zeros((batch, max_len), jnp.int32),
                       jnp.zeros((batch, max_len), bool))

    def prefill_hidden(self, input_ids, positions, cache: KVCache, valid):
        """Write prompts [B, P] (valid [B, P]: real tokens) into slots 0..P-1 of every row, marking every
        later slot empty; -> (final-norm hidden states [B, P, D], cache).

        The prompt attends only to itself, so this costs P x P, not P x S.
        """
        p, s = input_ids.shape[1], cache.valid.shape[1]
        valid = valid.astype(bool)
        rope = self._rope(positions)

        def body(x, layer, xs):
            q, k, v = layer.qkv(layer.input_layernorm(x), *self._layer_rope(rope, xs))
            out = self._attend(q, k, v, q_positions=positions, kv_positions=positions, kv_valid=valid,
                               **self._window(xs))
            return layer.finish(x, out), (k.astype(cache.k.dtype), v.astype(cache.v.dtype))

        x, (k, v) = self._run_layers(body, self.embed(input_ids), self._layer_xs())
        cache = KVCache(
            jax.lax.dynamic_update_slice(cache.k, k, (0, 0, 0, 0, 0)),
            jax.lax.dynamic_update_slice(cache.v, v, (0, 0, 0, 0, 0)),
            jax.lax.dynamic_update_slice(cache.positions, positions.astype(jnp.int32), (0, 0)),
            jnp.concatenate([valid, jnp.zeros((valid.shape[0], s - p), bool)], axis=1),
        )
        return self.norm(x), cache

    def decode_step(self, input_ids, positions, cache: KVCache, cache_index, kv_filled=None):
        """Run T new tokens against the cache; they are written at slots cache_index..cache_index+T-1
        (cache_index: a scalar, or [B] for a slot per row).

        Query t attends slot s iff cache.valid[b, s] and cache.positions[b, s] <= positions[b, t].
        """
        hidden, new_cache = self.decode_hidden(input_ids, positions, cache, cache_index, kv_filled)
        return self.logits_from_hidden(hidden), new_cache

    def decode_hidden(self, input_ids, positions, cache: KVCache, cache_index, kv_filled=None):
        """`decode_step` without the vocabulary projection: (final-norm hidden states [B,T,D], cache).

        The layer scan only reads the cache: each layer attends over the cache's filled slots plus the new
        tokens' own keys, and returns those keys; they are written once after the scan, in place (a slice
        update at a shared scalar `cache_index`, one slice update per row for a [B] one). Writing into a cache
        carried through the scan made XLA:CPU copy each layer's cache every step.

        Attention visits only cache slots below `kv_filled` (default: the write slot, max over rows; the
        chunked backend skips the empty tail). A caller whose rows fill the cache out of order passes its
        own bound. Slots being written are never read as old entries, whatever they held before.
        """
        b, t = input_ids.shape
        positions = positions.astype(jnp.int32)
        cache_index = jnp.asarray(cache_index, jnp.int32)
        per_row = cache_index.ndim == 1

        def write(buffer, update, axis):
            """update [..., B, ..., T, ...] into buffer at cache_index along `axis` (the slot axis)."""
            if not per_row:
                return jax.lax.dynamic_update_slice_in_dim(buffer, update.astype(buffer.dtype), cache_index, axis)
            # One in-place slice update per row: XLA:CPU turns a vmapped update (a scatter) into a copy of the
            # whole cache.
            row_axis = 0 if axis == 1 else 1  # [B, S] metadata: rows on 0; [L, B, KV, S, Dh]: rows on 1
            update = update.astype(buffer.dtype)

            def one(r, buf):
                start = [0] * buf.ndim
                start[row_axis], start[axis] = r, cache_index[r]
                row = jax.lax.dynamic_slice_in_dim(update, r, 1, row_axis)
                return jax.lax.dynamic_update_slice(buf, row, start)

            return jax.lax.fori_loop(0, b, one, buffer)

        old_valid = write(cache.valid, jnp.zeros((b, t), bool), 1)
        filled = (jnp.max(cache_index) if per_row else cache_index) if kv_filled is None else kv_filled
        rope = self._rope(positions)

        def body(x, layer, xs):
            q, k, v = layer.qkv(layer.input_layernorm(x), *self._layer_rope(rope, xs))
            out = self._attend(q, cache.k, cache.v, layer=xs["index"], q_positions=positions,
                               kv_positions=cache.positions, kv_valid=old_valid, kv_filled=filled, new_kv=(k, v),
                               **self._window(xs))
            return layer.finish(x, out.astype(x.dtype)), (k, v)

        x, (k_new, v_new) = self._run_layers(body, self.embed(input_ids), self._layer_xs())
        new_cache = KVCache(write(cache.k, k_new, 3), write(cache.v, v_new, 3), write(cache.positions, positions, 1),
                            write(cache.valid, jnp.ones((b, t), bool), 1))
        return self.norm(x), new_cache


def set_attention(model: CausalLM, backend: str) -> CausalLM:
    """Switch the attention backend of a built model in place (it is static: jitted callers recompile)."""
    model.attention = check_backend(backend)
    return model

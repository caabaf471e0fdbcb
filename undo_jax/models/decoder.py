"""Flax NNX causal decoder for the Llama family, Qwen2/2.5 and Qwen3.

One module covers the three families; they differ only in QKV bias (Qwen2), per-head q/k
RMSNorm (Qwen3), tied embeddings and RoPE scaling (Llama 3). Every parameter carries
`logical_axes` metadata that `undo_jax.sharding` maps onto a device mesh.

Parameter dtype and compute dtype are separate: weights are cast to `dtype` at use, norms and
softmax run in float32, logits are returned in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from undo_jax.models.config import ModelConfig

_INIT_STD = 0.02
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: fully masked rows stay NaN-free


def _param(rngs: nnx.Rngs, shape, axes, dtype, *, zeros=False, ones=False) -> nnx.Param:
    if ones:
        value = jnp.ones(shape, dtype)
    elif zeros:
        value = jnp.zeros(shape, dtype)
    else:
        value = (_INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, axis_name: str | None, param_dtype, rngs: nnx.Rngs):
        self.weight = _param(rngs, (dim,), (axis_name,), param_dtype, ones=True)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        # HF multiplies in the input dtype after the float32 normalisation.
        return self.weight[...].astype(dtype) * x.astype(dtype)


def rope_inv_freq(config: ModelConfig) -> jax.Array:
    """Inverse frequencies, including Llama 3's piecewise `rope_scaling` (type llama3)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
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


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, h, kv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), param_dtype)
        self.k_proj = _param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.v_proj = _param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.o_proj = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), param_dtype)
        if config.attention_bias:
            self.q_bias = _param(rngs, (h, hd), ("heads", "head_dim"), param_dtype, zeros=True)
            self.k_bias = _param(rngs, (kv, hd), ("kv_heads", "head_dim"), param_dtype, zeros=True)
            self.v_bias = _param(rngs, (kv, hd), ("kv_heads", "head_dim"), param_dtype, zeros=True)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.rms_norm_eps, axis_name="head_dim", param_dtype=param_dtype, rngs=rngs)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps, axis_name="head_dim", param_dtype=param_dtype, rngs=rngs)
        self.has_bias = config.attention_bias
        self.has_qk_norm = config.qk_norm
        self.num_groups = h // kv
        self.scale = hd**-0.5
        self.dtype = dtype

    def project_qkv(self, x, cos, sin):
        dt = self.dtype
        q = jnp.einsum("btd,dnh->btnh", x, self.q_proj[...].astype(dt))
        k = jnp.einsum("btd,dnh->btnh", x, self.k_proj[...].astype(dt))
        v = jnp.einsum("btd,dnh->btnh", x, self.v_proj[...].astype(dt))
        if self.has_bias:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        if self.has_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, mask):
        """q [B,T,H,Dh], k/v [B,S,KV,Dh], mask [B,T,S] bool -> [B,T,D]."""
        b, t, h, hd = q.shape
        kv = k.shape[2]
        q = q.reshape(b, t, kv, self.num_groups, hd)
        scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * self.scale
        scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, h, hd)
        return jnp.einsum("btnh,nhd->btd", out, self.o_proj[...].astype(self.dtype))

    def __call__(self, x, cos, sin, mask):
        q, k, v = self.project_qkv(x, cos, sin)
        return self.attend(q, k, v, mask)

    def decode(self, x, cos, sin, mask, cache, cache_index):
        q, k, v = self.project_qkv(x, cos, sin)
        k_cache, v_cache = cache
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, cache_index, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, cache_index, 0, 0))
        out = self.attend(q, k_cache.astype(self.dtype), v_cache.astype(self.dtype), mask)
        return out, (k_cache, v_cache)


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), param_dtype)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), param_dtype)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), param_dtype)
        self.dtype = dtype

    def __call__(self, x):
        dt = self.dtype
        gate = x @ self.gate_proj[...].astype(dt)
        up = x @ self.up_proj[...].astype(dt)
        return (jax.nn.silu(gate) * up) @ self.down_proj[...].astype(dt)


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, axis_name="norm", param_dtype=param_dtype, rngs=rngs)
        self.self_attn = Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, eps, axis_name="norm", param_dtype=param_dtype, rngs=rngs
        )
        self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode(self, x, cos, sin, mask, cache, cache_index):
        attn, cache = self.self_attn.decode(self.input_layernorm(x), cos, sin, mask, cache, cache_index)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), cache


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


def attention_mask_matrix(t: int, attention_mask=None, segment_ids=None) -> jax.Array:
    """[B or 1, T, T] bool: causal, restricted to real keys and to the query's own segment."""
    mask = jnp.tril(jnp.ones((t, t), bool))[None]
    if attention_mask is not None:
        mask = mask & attention_mask.astype(bool)[:, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
    return mask


class CausalLM(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        self.embed_tokens = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), param_dtype)
        self.layers = nnx.List(
            [DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
             for _ in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, axis_name="norm", param_dtype=param_dtype,
                            rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), param_dtype)

    def embed(self, input_ids):
        return jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)

    def hidden_states(self, input_ids, *, attention_mask=None, positions=None, segment_ids=None, remat=False):
        if positions is None:
            positions = default_positions(input_ids, attention_mask, segment_ids)
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.config))
        mask = attention_mask_matrix(input_ids.shape[1], attention_mask, segment_ids)
        x = self.embed(input_ids)
        for layer in self.layers:
            if remat:
                x = nnx.remat(lambda lyr, h: lyr(h, cos, sin, mask))(layer, x)
            else:
                x = layer(x, cos, sin, mask)
        return self.norm(x)

    def logits_from_hidden(self, h):
        if self.config.tie_word_embeddings:
            w = self.embed_tokens[...].astype(self.dtype)
            return jnp.einsum("...d,vd->...v", h, w, preferred_element_type=jnp.float32)
        return jnp.einsum("...d,dv->...v", h, self.lm_head[...].astype(self.dtype), preferred_element_type=jnp.float32)

    def __call__(self, input_ids, *, attention_mask=None, positions=None, segment_ids=None):
        h = self.hidden_states(input_ids, attention_mask=attention_mask, positions=positions, segment_ids=segment_ids)
        return self.logits_from_hidden(h)

    # ---- KV-cache decoding (used by undo_jax.sampling) ----
    def init_cache(self, batch: int, max_len: int, dtype=None) -> list[tuple[jax.Array, jax.Array]]:
        c = self.config
        shape = (batch, max_len, c.num_key_value_heads, c.head_dim)
        dt = dtype or self.dtype
        return [(jnp.zeros(shape, dt), jnp.zeros(shape, dt)) for _ in range(c.num_hidden_layers)]

    def decode_step(self, input_ids, positions, cache, cache_index, kv_valid):
        """Run T new tokens against the cache; they are written at slots cache_index..cache_index+T-1.

        Query t attends slot s iff kv_valid[b, s] and s <= cache_index + t.
        """
        hidden, new_cache = self.decode_hidden(input_ids, positions, cache, cache_index, kv_valid)
        return self.logits_from_hidden(hidden), new_cache

    def decode_hidden(self, input_ids, positions, cache, cache_index, kv_valid):
        """`decode_step` without the vocabulary projection: (final-norm hidden states [B,T,D], cache).

        A prefill needs only the last position's logits; projecting all of them would cost far more
        than the rest of the step.
        """
        t = input_ids.shape[1]
        s = cache[0][0].shape[1]
        slots = jnp.arange(s)[None, :]
        q_slots = cache_index + jnp.arange(t)[:, None]
        mask = kv_valid[:, None, :] & (slots <= q_slots)[None]
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.config))
        x = self.embed(input_ids)
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            x, layer_cache = layer.decode(x, cos, sin, mask, layer_cache, cache_index)
            new_cache.append(layer_cache)
        return self.norm(x), new_cache

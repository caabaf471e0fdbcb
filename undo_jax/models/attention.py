"""One attention function for training, prefill and decode, with interchangeable backends.

`attention(q, k, v, ...)` takes queries [B, T, H, Dh] and keys/values in the KV-cache layout
[B, KV, S, Dh] (or the stacked cache [L, B, KV, S, Dh] plus a `layer` index), and builds the mask
from per-row positions, never from a precomputed [T, S] matrix. Query t of row b may attend key s iff

    kv_valid[b, s]  and  kv_positions[b, s] <= q_positions[b, t]
    and q_segment_ids[b, t] == kv_segment_ids[b, s]          (when segment ids are given)
    and q_positions[b, t] - kv_positions[b, s] < sliding_window (when a window is given)

which covers left padding (kv_valid), packed rows (segment ids), a KV cache with stale slots
(kv_valid), and local attention layers (sliding_window). `window_active` (a traced bool scalar)
switches the window on or off per call, so a layer scan can mix local and global layers (Gemma 3)
with one compiled body. GQA: H is a multiple of KV.

Backends:
- `reference`: einsum over the whole [T, S] score matrix (float32), the baseline of the tests;
- `chunked`: blockwise over keys with an online softmax, exact to float32 rounding. Training uses a
  custom VJP that saves only the output and the log-sum-exp and recomputes scores block by block, so
  no [T, S] buffer is ever alive; decode visits only the blocks below `kv_filled` (the filled prefix);
- `xla`: `jax.nn.dot_product_attention` (cuDNN flash attention on GPU when it applies);
- `tpu`: the Pallas splash-attention kernel (TPU only; `tpu_interpret` or `interpret=True` runs it
  in the Pallas interpreter anywhere, which is how the tests check it on CPU);
- `auto`: `tpu` on TPU for self-attention (T == S), `xla` on GPU, `chunked` otherwise.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# tpu_interpret: the tpu kernel run by the Pallas interpreter (any platform; slow: for tests on CPU).
BACKENDS = ("auto", "reference", "chunked", "xla", "tpu", "tpu_interpret")
DEFAULT_BLOCK = 256
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: fully masked rows stay NaN-free
NO_WINDOW = 2**30  # a window no position difference reaches: the traced "window off" value


class AttentionError(ValueError):
    """An attention backend that is unknown or cannot run on this platform or shape."""


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise AttentionError(f"attention backend {name!r} is unknown; choose one of {', '.join(BACKENDS)}")
    return name


def resolve_backend(name: str, *, self_attention: bool, platform: str | None = None) -> str:
    """The concrete backend `name` stands for on `platform` (default: JAX's default backend)."""
    check_backend(name)
    platform = platform or jax.default_backend()
    if name == "auto":
        if platform == "tpu" and self_attention:
            return "tpu"
        return "xla" if platform == "gpu" else "chunked"
    return name


def attention(q, k, v, *, q_positions, kv_positions, kv_valid=None, q_segment_ids=None, kv_segment_ids=None,
              sliding_window: int | None = None, window_active=None, kv_filled=None, layer=None,
              scale: float | None = None, backend: str = "auto", block_size: int | None = None,
              interpret: bool = False, new_kv=None):
    """Masked multi-head attention -> [B, T, H, Dh] in q's dtype (softmax in float32).

    q [B, T, H, Dh]; k, v [B, KV, S, Dh], or [L, B, KV, S, Dh] with `layer` (an int or traced
    scalar) picking one layer of a stacked cache; q_positions [B, T] and
    kv_positions [B, S] int; kv_valid [B, S] bool (default all valid); segment ids [B, T] / [B, S]
    int (both or neither); kv_filled: a scalar bound, every slot >= kv_filled is invalid (lets the
    chunked backend skip the unfilled tail of a preallocated cache); window_active: None (the window,
    if any, always applies) or a bool scalar, possibly traced, saying whether `sliding_window` applies;
    scale default Dh ** -0.5; block_size: keys per chunked block (default DEFAULT_BLOCK).
    new_kv: (k [B, KV, T, Dh], v [B, KV, T, Dh]) of the queries' own tokens (decode), attended besides the
    cache under the same rule (their positions are q_positions, all valid). The cache is then only read, and
    the caller writes the new keys after the layer scan: no per-layer update of the carried cache.
    """
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise AttentionError("attention: pass both q_segment_ids and kv_segment_ids, or neither")
    if k.ndim == 5 and layer is None:
        raise AttentionError("attention: a stacked [L, B, KV, S, Dh] cache needs `layer`")
    s_len = k.shape[-2]
    if kv_valid is None:
        kv_valid = jnp.ones(kv_positions.shape, bool)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    name = resolve_backend(backend, self_attention=q.shape[1] == s_len and kv_filled is None and new_kv is None)
    if new_kv is not None and name not in ("reference", "chunked", "xla"):
        raise AttentionError(f"attention backend {name!r}: decode against a cache (new_kv) needs reference, "
                             "chunked or xla")
    if new_kv is not None and q_segment_ids is not None:
        raise AttentionError("attention: new_kv (decode) takes no segment ids")
    if new_kv is not None and name == "chunked":
        return _chunked_decode(q, k, v, new_kv, q_positions, kv_positions, kv_valid, layer=layer,
                               kv_filled=kv_filled, block=min(block_size or DEFAULT_BLOCK, s_len),
                               window=_traced_window(sliding_window, window_active), scale=scale)
    if k.ndim == 5:
        # One layer's [B, KV, S, Dh] slice first: measured 3-4x faster on XLA:CPU than reading key blocks
        # straight out of the stacked cache carried through the layer scan (that made XLA copy it).
        k, v = k[layer], v[layer]
    if new_kv is not None:  # reference / xla: the new keys appended to the cache (a copy; fine off the hot path)
        t = q.shape[1]
        k = jnp.concatenate([k, new_kv[0].astype(k.dtype)], axis=2)
        v = jnp.concatenate([v, new_kv[1].astype(v.dtype)], axis=2)
        kv_positions = jnp.concatenate([kv_positions, q_positions.astype(kv_positions.dtype)], axis=1)
        if kv_filled is not None:
            kv_valid = kv_valid & (jnp.arange(s_len) < kv_filled)[None]
        kv_valid = jnp.concatenate([kv_valid, jnp.ones((q.shape[0], t), bool)], axis=1)
    masks = (q_positions, kv_positions, kv_valid, q_segment_ids, kv_segment_ids)
    if name in ("tpu", "tpu_interpret") and sliding_window is not None and window_active is not None:
        # The splash kernel's mask is static: choose between the local and the causal kernel at run time.
        def run(window):
            return _splash(q, k, v, *masks, window=window, scale=scale, interpret=interpret or name == "tpu_interpret")

        return jax.lax.cond(window_active, lambda: run(sliding_window), lambda: run(None))
    sliding_window = _traced_window(sliding_window, window_active)
    if name == "reference":
        return _reference(q, k, v, *masks, window=sliding_window, scale=scale)
    if name == "xla":
        return _xla(q, k, v, *masks, window=sliding_window, scale=scale)
    if name in ("tpu", "tpu_interpret"):
        return _splash(q, k, v, *masks, window=sliding_window, scale=scale,
                       interpret=interpret or name == "tpu_interpret")
    block = min(block_size or DEFAULT_BLOCK, s_len)
    if k.ndim == 4 and kv_filled is None:
        return _chunked_vjp(block, scale)(q, k, v, *masks, sliding_window)
    return _chunked_forward(q, k, v, *masks, kv_filled=kv_filled, block=block, window=sliding_window,
                            scale=scale)[0]


# ---------------------------------------------------------------- masks and layouts
def _traced_window(window, active):
    """The window as one value: None, the static int, or (with a traced switch) NO_WINDOW when off."""
    if window is not None and active is not None:
        return jnp.where(active, jnp.int32(window), jnp.int32(NO_WINDOW))
    return window


def allowed(q_pos, kv_pos, kv_valid, q_seg, kv_seg, window) -> jax.Array:
    """[B, T, S] bool: the attention rule of the module docstring."""
    ok = kv_valid[:, None, :] & (kv_pos[:, None, :] <= q_pos[:, :, None])
    if q_seg is not None:
        ok = ok & (q_seg[:, :, None] == kv_seg[:, None, :])
    if window is not None:
        ok = ok & (q_pos[:, :, None] - kv_pos[:, None, :] < window)
    return ok


def _group_queries(q, num_kv):
    """[B, T, H, Dh] -> [B, KV, G, T, Dh] (query heads of one KV head together, as HF groups them)."""
    b, t, h, d = q.shape
    return q.reshape(b, t, num_kv, h // num_kv, d).transpose(0, 2, 3, 1, 4)


def _ungroup(out):
    """[B, KV, G, T, Dh] -> [B, T, H, Dh]."""
    b, kv, g, t, d = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, d)


# ---------------------------------------------------------------- reference
def _reference(q, k, v, q_pos, kv_pos, kv_valid, q_seg, kv_seg, *, window, scale):
    qg = _group_queries(q, k.shape[1])
    scores = jnp.einsum("bkgth,bksh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = allowed(q_pos, kv_pos, kv_valid, q_seg, kv_seg, window)
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return _ungroup(jnp.einsum("bkgts,bksh->bkgth", probs, v)).astype(q.dtype)


# ---------------------------------------------------------------- chunked (online softmax)
def _block_start(j, block, s_len):
    """Blocks are [start, start + block); the last one is shifted left to stay inside S (its overlap
    with the previous block is masked by `first`, so every slot counts once)."""
    first = j * block
    return jnp.minimum(first, s_len - block), first


def _slice_keys(k, v, kv_pos, kv_valid, kv_seg, start, block, layer=None):
    """One key block; from a stacked [L, B, KV, S, Dh] cache (with `layer`) it is sliced straight out of the
    stack, with no copy of the layer's whole cache."""
    if layer is None:
        kb = jax.lax.dynamic_slice_in_dim(k, start, block, axis=2)
        vb = jax.lax.dynamic_slice_in_dim(v, start, block, axis=2)
    else:
        size = (1, *k.shape[1:3], block, k.shape[4])
        kb = jax.lax.dynamic_slice(k, (layer, 0, 0, start, 0), size)[0]
        vb = jax.lax.dynamic_slice(v, (layer, 0, 0, start, 0), size)[0]
    cols = (jax.lax.dynamic_slice_in_dim(kv_pos, start, block, axis=1),
            jax.lax.dynamic_slice_in_dim(kv_valid, start, block, axis=1),
            None if kv_seg is None else jax.lax.dynamic_slice_in_dim(kv_seg, start, block, axis=1))
    return kb, vb, cols


def _block_mask(q_pos, q_seg, cols, start, first, block, window):
    pos, valid, seg = cols
    fresh = (start + jnp.arange(block)) >= first  # not already counted by the previous block
    return allowed(q_pos, pos, valid & fresh[None], q_seg, seg, window)[:, None, None]


def _chunked_forward(q, k, v, q_pos, kv_pos, kv_valid, q_seg, kv_seg, *, kv_filled, block, window, scale):
    """-> (out [B, T, H, Dh], lse [B, KV, G, T] float32; +inf on fully masked rows)."""
    qg = _group_queries(q, k.shape[-3]) * jnp.asarray(scale, q.dtype)
    carry = _chunked_blocks(qg, k, v, q_pos, kv_pos, kv_valid, q_seg, kv_seg, kv_filled=kv_filled, block=block,
                            window=window)
    return _online_finish(*carry, q.dtype)


def _chunked_blocks(qg, k, v, q_pos, kv_pos, kv_valid, q_seg, kv_seg, *, kv_filled, block, window, layer=None):
    """The online softmax carry over the key blocks below kv_filled (all blocks when None)."""
    s_len = k.shape[-2]
    num_blocks = math.ceil(s_len / block)
    if kv_filled is not None:
        num_blocks = jnp.minimum((kv_filled + block - 1) // block, num_blocks)

    def body(j, carry):
        start, first = _block_start(j, block, s_len)
        kb, vb, cols = _slice_keys(k, v, kv_pos, kv_valid, kv_seg, start, block, layer)
        return _online_update(carry, qg, kb, vb, _block_mask(q_pos, q_seg, cols, start, first, block, window))

    return jax.lax.fori_loop(0, num_blocks, body, _online_init(qg))


def _online_init(qg):
    b, kvh, g, t, d = qg.shape
    return (jnp.full((b, kvh, g, t), MASK_VALUE, jnp.float32), jnp.zeros((b, kvh, g, t), jnp.float32),
            jnp.zeros((b, kvh, g, t, d), jnp.float32))


def _online_update(carry, qg, kb, vb, mask):
    """One key block into the running (max, sum, weighted values) of the online softmax."""
    m, total, acc = carry
    s = jnp.einsum("bkgth,bksh->bkgts", qg, kb, preferred_element_type=jnp.float32)
    s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    total = total * corr + p.sum(-1)
    acc = acc * corr[..., None] + jnp.einsum("bkgts,bksh->bkgth", p.astype(vb.dtype), vb,
                                             preferred_element_type=jnp.float32)
    return m_new, total, acc


def _online_finish(m, total, acc, dtype):
    """-> (out [B, T, H, Dh], lse [B, KV, G, T] float32; +inf on fully masked rows)."""
    seen = total > 0  # False: a fully masked query row (output 0, lse +inf so its backward is 0)
    safe = jnp.where(seen, total, 1.0)
    out = acc / safe[..., None]
    lse = jnp.where(seen, m + jnp.log(safe), jnp.inf)
    return _ungroup(out).astype(dtype), lse


def _chunked_decode(q, k, v, new_kv, q_pos, kv_pos, kv_valid, *, layer, kv_filled, block, window, scale):
    """Decode: the online softmax over the filled blocks of the (read-only) cache, then one more update with the
    queries' own keys new_kv. k/v [B, KV, S, Dh], or the stacked [L, B, KV, S, Dh] with `layer`."""
    qg = _group_queries(q, k.shape[-3]) * jnp.asarray(scale, q.dtype)
    carry = _chunked_blocks(qg, k, v, q_pos, kv_pos, kv_valid, None, None, kv_filled=kv_filled, block=block,
                            window=window, layer=layer if k.ndim == 5 else None)
    own = allowed(q_pos, q_pos, jnp.ones(q_pos.shape, bool), None, None, window)[:, None, None]
    carry = _online_update(carry, qg, new_kv[0].astype(k.dtype), new_kv[1].astype(v.dtype), own)
    return _online_finish(*carry, q.dtype)[0]


@functools.cache
def _chunked_vjp(block: int, scale: float):
    """The training form of `chunked`: a custom VJP that saves (out, lse) and recomputes each block.
    The window (None, an int, or a traced scalar) is an operand, so local and global layers share one body."""

    def forward(q, k, v, q_pos, kv_pos, kv_valid, q_seg, kv_seg, window):
        return _chunked_forward(q, k, v, q_pos, kv_pos, kv_valid, q_seg, kv_seg, kv_filled=None, block=block,
                                window=window, scale=scale)

    @jax.custom_vjp
    def fn(q, k, v, q_pos, kv_pos, kv_valid, q_seg, kv_seg, window):
        return forward(q, k, v, q_pos, kv_pos, kv_valid, q_seg, kv_seg, window)[0]

    def fwd(q, k, v, q_pos, kv_pos, kv_valid, q_seg, kv_seg, window):
        out, lse = forward(q, k, v, q_pos, kv_pos, kv_valid, q_seg, kv_seg, window)
        return out, (q, k, v, q_pos, kv_pos, kv_valid, q_seg, kv_seg, window, out, lse)

    def bwd(res, d_out):
        q, k, v, q_pos, kv_pos, kv_valid, q_seg, kv_seg, window, out, lse = res
        s_len, num_kv = k.shape[2], k.shape[1]
        qg = _group_queries(q, num_kv).astype(jnp.float32) * scale
        do = _group_queries(d_out, num_kv).astype(jnp.float32)
        delta = jnp.sum(do * _group_queries(out, num_kv).astype(jnp.float32), axis=-1)  # [B, KV, G, T]

        def body(j, carry):
            dq, dk, dv = carry
            start, first = _block_start(j, block, s_len)
            kb, vb, cols = _slice_keys(k, v, kv_pos, kv_valid, kv_seg, start, block)
            kb, vb = kb.astype(jnp.float32), vb.astype(jnp.float32)
            mask = _block_mask(q_pos, q_seg, cols, start, first, block, window)
            s = jnp.einsum("bkgth,bksh->bkgts", qg, kb)
            p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
            dp = jnp.einsum("bkgth,bksh->bkgts", do, vb)
            ds = p * (dp - delta[..., None])
            dq = dq + jnp.einsum("bkgts,bksh->bkgth", ds, kb)
            dk_b = jnp.einsum("bkgts,bkgth->bksh", ds, qg)
            dv_b = jnp.einsum("bkgts,bkgth->bksh", p, do)
            dk = jax.lax.dynamic_update_slice_in_dim(
                dk, jax.lax.dynamic_slice_in_dim(dk, start, block, axis=2) + dk_b, start, axis=2)
            dv = jax.lax.dynamic_update_slice_in_dim(
                dv, jax.lax.dynamic_slice_in_dim(dv, start, block, axis=2) + dv_b, start, axis=2)
            return dq, dk, dv

        init = (jnp.zeros(qg.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
        dq, dk, dv = jax.lax.fori_loop(0, math.ceil(s_len / block), body, init)
        dq = _ungroup(dq * scale).astype(q.dtype)
        return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None, None, None

    fn.defvjp(fwd, bwd)
    return fn


# ---------------------------------------------------------------- xla
def _xla(q, k, v, q_pos, kv_pos, kv_valid, q_seg, kv_seg, *, window, scale):
    mask = allowed(q_pos, kv_pos, kv_valid, q_seg, kv_seg, window)[:, None]  # [B, 1, T, S]
    # cuDNN on GPU when the shapes and dtypes allow it (jax decides); XLA's own path elsewhere.
    implementation = None if jax.default_backend() == "gpu" else "xla"
    out = jax.nn.dot_product_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask=mask,
                                       scale=scale, implementation=implementation)
    return out.astype(q.dtype)


# ---------------------------------------------------------------- tpu (Pallas splash attention)
_SPLASH_BLOCK = 128


def _splash(q, k, v, q_pos, kv_pos, kv_valid, q_seg, kv_seg, *, window, scale, interpret):
    """Causal by index (the kernel's mask is static): exact for our callers, whose positions rise with the
    index inside each segment; left padding and packing become segment ids (padding = segment 0)."""
    platform = jax.default_backend()
    if platform != "tpu" and not interpret:
        raise AttentionError(f"attention backend 'tpu': the Pallas splash kernel needs a TPU (this is {platform}); "
                             "use tpu_interpret to emulate it, or chunked / xla")
    t, s_len = q.shape[1], k.shape[2]
    if t != s_len:
        raise AttentionError(f"attention backend 'tpu': the splash kernel serves self-attention (T == S), got "
                             f"T={t} queries over S={s_len} keys; use chunked for decode")
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    padded = math.ceil(t / _SPLASH_BLOCK) * _SPLASH_BLOCK
    seg = jnp.where(kv_valid, 1 if kv_seg is None else kv_seg, 0).astype(jnp.int32)
    q_side = seg if q_seg is None else jnp.where(kv_valid, q_seg, 0).astype(jnp.int32)
    pad = padded - t
    num_kv, groups = k.shape[1], q.shape[2] // k.shape[1]
    qg = _group_queries(q, num_kv) * jnp.asarray(scale, q.dtype)
    if pad:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
        k = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0)))
        seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1)
        q_side = jnp.pad(q_side, ((0, 0), (0, pad)), constant_values=-1)
    if window is None:
        one = mask_lib.CausalMask((padded, padded))
    else:
        one = mask_lib.LocalMask((padded, padded), window_size=(window - 1, 0), offset=0)
    sizes = splash.BlockSizes(block_q=_SPLASH_BLOCK, block_kv=_SPLASH_BLOCK, block_kv_compute=_SPLASH_BLOCK,
                              block_q_dkv=_SPLASH_BLOCK, block_kv_dkv=_SPLASH_BLOCK,
                              block_kv_dkv_compute=_SPLASH_BLOCK, block_q_dq=_SPLASH_BLOCK,
                              block_kv_dq=_SPLASH_BLOCK)
    kernel = splash.make_splash_mqa_single_device(mask_lib.MultiHeadMask([one] * groups), block_sizes=sizes,
                                                  interpret=interpret)

    def per_row(qr, kr, vr, q_ids, kv_ids):  # qr [KV, G, T, Dh], kr/vr [KV, S, Dh]
        ids = splash.SegmentIds(q=q_ids, kv=kv_ids)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(qr, kr, vr)

    out = jax.vmap(per_row)(qg, k, v, q_side, seg)[:, :, :, :t]
    return _ungroup(out).astype(q.dtype)

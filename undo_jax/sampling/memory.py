"""Memory needed by one generation batch, checked before anything is allocated.

KV cache bytes = 2 (k and v) x layers x batch x (prompt bucket + max_new_tokens)
                 x num_key_value_heads x head_dim x bytes per element (the model's compute dtype).

The prefill also holds, for one layer at a time, float32 attention scores and probabilities
[batch, heads, prompt bucket, cache length] and the MLP activations of the whole prompt.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from undo_jax.models.config import ModelConfig

_GIB = 1024**3
# Keep a margin for the parameters' transients, XLA workspace and fragmentation.
_USABLE_FRACTION = 0.9


class CacheSizeError(ValueError):
    """A batch x length that cannot fit in the free memory of the device(s)."""


@dataclasses.dataclass(frozen=True)
class BatchMemory:
    kv_cache: int
    prefill_activations: int

    @property
    def total(self) -> int:
        return self.kv_cache + self.prefill_activations


def kv_cache_bytes(config: ModelConfig, batch: int, cache_len: int, dtype) -> int:
    """Bytes of the KV cache of `batch` rows of `cache_len` slots (formula in the module docstring)."""
    itemsize = np.dtype(dtype).itemsize
    return 2 * config.num_hidden_layers * batch * cache_len * config.num_key_value_heads * config.head_dim * itemsize


def batch_memory(config: ModelConfig, batch: int, prompt_len: int, max_new_tokens: int, dtype) -> BatchMemory:
    cache_len = prompt_len + max_new_tokens
    itemsize = np.dtype(dtype).itemsize
    scores = 2 * 4 * batch * config.num_attention_heads * prompt_len * cache_len  # scores + probs, float32
    mlp = 3 * batch * prompt_len * config.intermediate_size * itemsize
    hidden = 4 * batch * prompt_len * config.hidden_size * 4
    logits = 2 * batch * config.vocab_size * 4
    return BatchMemory(kv_cache_bytes(config, batch, cache_len, dtype), scores + mlp + hidden + logits)


def free_bytes(device: jax.Device) -> tuple[int | None, str]:
    """Free memory of `device` (accelerator: allocator limit minus use; CPU: the host's available RAM)."""
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without allocator statistics raise various errors
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), str(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "host RAM"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host RAM"
    except (ValueError, OSError):
        return None, "unknown"


def check_fits(config: ModelConfig, *, batch: int, prompt_len: int, max_new_tokens: int, dtype,
               devices: list[jax.Device]) -> BatchMemory:
    """Raise CacheSizeError when a batch cannot fit; the batch is split evenly over `devices`."""
    need = batch_memory(config, batch, prompt_len, max_new_tokens, dtype)
    accelerators = [d for d in devices if d.platform != "cpu"]
    if accelerators:
        per_device = need.total / len(devices)
        free, where = min((free_bytes(d) for d in accelerators), key=lambda fw: fw[0] if fw[0] is not None else 1 << 62)
    else:  # simulated CPU devices share one host memory
        per_device = need.total
        free, where = free_bytes(devices[0])
    if free is not None and per_device > _USABLE_FRACTION * free:
        raise CacheSizeError(
            f"generate: a batch of {batch} rows x cache length {prompt_len + max_new_tokens} "
            f"(prompt bucket {prompt_len} + max_new_tokens {max_new_tokens}) needs "
            f"{per_device / _GIB:.2f} GiB per device "
            f"(KV cache {need.kv_cache / _GIB:.2f} GiB + prefill activations {need.prefill_activations / _GIB:.2f} GiB "
            f"in total) but only {free / _GIB:.2f} GiB is free on {where}; lower batch_size or max_new_tokens"
        )
    return need

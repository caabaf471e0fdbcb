"""KV-cache batched generation (greedy and sampled) and maj@k voting."""

from undo_jax.sampling.generate import DEFAULT_BATCH_SIZE, Completion, end_token_ids, generate, prompt_bucket
from undo_jax.sampling.memory import CacheSizeError, batch_memory, kv_cache_bytes
from undo_jax.sampling.sample import SamplingSettings, filter_logits
from undo_jax.sampling.vote import majority_vote

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "CacheSizeError",
    "Completion",
    "SamplingSettings",
    "batch_memory",
    "end_token_ids",
    "filter_logits",
    "generate",
    "kv_cache_bytes",
    "majority_vote",
    "prompt_bucket",
]

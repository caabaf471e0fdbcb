"""undo_jax: iterative rationale distillation (UNDO) in JAX/Flax NNX."""

__version__ = "0.1.0"

"""Student models: Flax NNX decoders for Llama/SmolLM2, Qwen2/2.5 and Qwen3, with HF and GGUF I/O."""

from undo_jax.models.config import SUPPORTED_MODEL_TYPES, ConfigError, ModelConfig
from undo_jax.models.decoder import CausalLM

__all__ = ["SUPPORTED_MODEL_TYPES", "CausalLM", "ConfigError", "ModelConfig"]
from undo_jax.models.hf_io import load_pretrained, load_tokenizer, save_pretrained  # noqa: E402

__all__ += ["load_pretrained", "load_tokenizer", "save_pretrained"]

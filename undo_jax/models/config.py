"""Model configuration: one dataclass for the Llama, Qwen2/2.5 and Qwen3 decoders.

Built from and written back to a Hugging Face `config.json`. Both the transformers-5 form
(`rope_parameters`) and the older top-level `rope_theta` / `rope_scaling` form are read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")

# HF architectures class names written back to config.json, so transformers' AutoModel picks
# the right class when it loads our export.
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


class ConfigError(ValueError):
    """A config.json that cannot describe a supported model."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # QKV bias (Qwen2); o_proj never has one in these families
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # Keys of the source config.json we do not model but carry through on export.
    extra: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise ConfigError(f"unsupported rope scaling type {kind!r}; supported: llama3")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def num_params(self) -> int:
        d, f, h, kv, hd, v = (self.hidden_size, self.intermediate_size, self.num_attention_heads,
                              self.num_key_value_heads, self.head_dim, self.vocab_size)
        attn = d * h * hd * 2 + d * kv * hd * 2
        if self.attention_bias:
            attn += h * hd + 2 * kv * hd
        if self.qk_norm:
            attn += 2 * hd
        layer = attn + 3 * d * f + 2 * d
        return v * d * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, where: str = "config.json") -> ModelConfig:
        d = dict(d)
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{where}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            n_heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            # transformers 5 nests theta and scaling in `rope_parameters`; older files keep them top level.
            rope_params = d.get("rope_parameters") or {}
            theta = rope_params.get("rope_theta", d.get("rope_theta", 10000.0))
            scaling = d.get("rope_scaling")
            if rope_params.get("rope_type", "default") != "default":
                scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
            if scaling is not None:
                kind = scaling.get("rope_type", scaling.get("type"))
                if kind in (None, "default"):
                    scaling = None
            known = dict(
                model_type=model_type,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=n_heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or n_heads),
                head_dim=int(d.get("head_dim") or hidden // n_heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=scaling,
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                # Qwen2 always has QKV bias and its config.json carries no flag for it.
                attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
                qk_norm=model_type == "qwen3",
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"),
                pad_token_id=d.get("pad_token_id"),
            )
        except KeyError as e:
            raise ConfigError(f"{where}: missing required key {e.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{where}: malformed value ({e})") from None
        if d.get("mlp_bias"):
            raise ConfigError(f"{where}: mlp_bias=true is not supported")
        consumed = set(known) | {"rope_parameters", "head_dim", "architectures", "torch_dtype", "dtype"}
        extra = {k: v for k, v in d.items() if k not in consumed}
        try:
            return cls(**known, extra=extra)
        except ConfigError as e:  # name the file in the checks __post_init__ makes
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ModelConfig:
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
        return cls.from_hf_dict(d, where=str(path))

    def to_hf_dict(self, *, dtype: str = "float32") -> dict[str, Any]:
        out = dict(self.extra)
        out.update(
            architectures=[_ARCHITECTURES[self.model_type]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            dtype=dtype,
        )
        if self.model_type != "qwen2":
            out["attention_bias"] = self.attention_bias
        # Write both forms: transformers 5 reads `rope_parameters`, older readers the top-level keys.
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
            rope["rope_type"] = rope.pop("type", rope.get("rope_type", "llama3"))
            out["rope_scaling"] = dict(self.rope_scaling)
        out["rope_parameters"] = rope
        out["rope_theta"] = self.rope_theta
        return out

    def __hash__(self):  # rope_scaling is a dict; NNX needs hashable static attributes
        return hash(json.dumps(self.to_hf_dict(), sort_keys=True, default=str))

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

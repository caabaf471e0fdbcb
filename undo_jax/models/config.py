"""Model configuration: one dataclass for the Llama, Qwen2/2.5, Qwen3 and Gemma 3 (text) decoders.

Built from and written back to a Hugging Face `config.json`. Both the transformers-5 form
(`rope_parameters`, per layer type for Gemma 3) and the older top-level `rope_theta` / `rope_scaling`
(/ `rope_local_base_freq`) form are read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "gemma3_text")

# HF architectures class names written back to config.json, so transformers' AutoModel picks
# the right class when it loads our export.
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "gemma3_text": "Gemma3ForCausalLM"}
SLIDING, FULL = "sliding_attention", "full_attention"  # HF's layer_types values
# Gemma 3 defaults of transformers' Gemma3TextConfig, for keys a config.json (or a GGUF) leaves out.
GEMMA3_DEFAULTS = {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6,
                   "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "tie_word_embeddings": True}


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
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3)
    # Gemma 3: local (sliding-window) layers and their RoPE base; rope_theta / rope_scaling are the global
    # layers'. layer_types: one of SLIDING / FULL per layer (None: every layer full attention).
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None
    query_pre_attn_scalar: int | float | None = None  # attention scale query_pre_attn_scalar ** -0.5 (else Dh ** -0.5)
    final_logit_softcapping: float | None = None
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
            supported = ("linear",) if self.is_gemma3 else ("llama3",)
            if kind not in (*supported, "default", None):
                raise ConfigError(f"unsupported rope scaling type {kind!r}; supported: {', '.join(supported)}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - {SLIDING, FULL}:
                raise ConfigError(f"layer_types must name {SLIDING!r} or {FULL!r} for each of the "
                                  f"{self.num_hidden_layers} layers, got {list(self.layer_types)}")
            if SLIDING in self.layer_types and not self.sliding_window:
                raise ConfigError("sliding_attention layers need a positive sliding_window")

    @property
    def is_gemma3(self) -> bool:
        """Gemma 3 block: (1 + w) RMSNorm, four norms per block, GeGLU (tanh GELU), sqrt(hidden)-scaled embedding."""
        return self.model_type == "gemma3_text"

    @property
    def local_layers(self) -> tuple[bool, ...]:
        """Per layer: does it attend through the sliding window (with the local RoPE base)?"""
        return tuple(t == SLIDING for t in (self.layer_types or (FULL,) * self.num_hidden_layers))

    @property
    def attention_scale(self) -> float:
        scalar = self.query_pre_attn_scalar or self.head_dim
        return float(scalar) ** -0.5

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
        layer = attn + 3 * d * f + (4 if self.is_gemma3 else 2) * d
        return v * d * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, where: str = "config.json") -> ModelConfig:
        d = dict(d)
        model_type = d.get("model_type")
        if model_type == "gemma3":  # the multimodal wrapper: only a text-only one is accepted, as its text part
            d, model_type = _gemma3_text_part(d, where), "gemma3_text"
        if model_type in ("gemma", "gemma2"):
            raise ConfigError(f"{where}: model_type {model_type!r} (Gemma 1/2) is not supported; "
                              "Gemma 3 (gemma3_text) is")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{where}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            known = _gemma3_fields(d) if model_type == "gemma3_text" else _llama_fields(d, model_type)
        except KeyError as e:
            raise ConfigError(f"{where}: missing required key {e.args[0]!r}") from None
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{where}: malformed value ({e})") from None
        if d.get("mlp_bias"):
            raise ConfigError(f"{where}: mlp_bias=true is not supported")
        consumed = set(known) | {"rope_parameters", "head_dim", "architectures", "torch_dtype", "dtype", "rope_scaling",
                                 "rope_local_base_freq", "sliding_window_pattern", "hidden_activation",
                                 "attn_logit_softcapping", "use_bidirectional_attention"}
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
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            dtype=dtype,
        )
        if self.model_type != "qwen2":
            out["attention_bias"] = self.attention_bias
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
            rope["rope_type"] = rope.pop("type", rope.get("rope_type", "linear" if self.is_gemma3 else "llama3"))
            out["rope_scaling"] = dict(self.rope_scaling)
        # Write both forms: transformers 5 reads `rope_parameters`, older readers the top-level keys.
        out["rope_theta"] = self.rope_theta
        if not self.is_gemma3:
            out.update(hidden_act="silu", rope_parameters=rope)
            return out
        local_rope = {"rope_type": "default", "rope_theta": self.rope_local_theta}
        out.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=self.query_pre_attn_scalar,
                   sliding_window=self.sliding_window, layer_types=list(self.layer_types or ()),
                   final_logit_softcapping=self.final_logit_softcapping, attn_logit_softcapping=None,
                   rope_local_base_freq=self.rope_local_theta, rope_parameters={FULL: rope, SLIDING: local_rope})
        return out

    def __hash__(self):  # rope_scaling is a dict; NNX needs hashable static attributes
        return hash(json.dumps(self.to_hf_dict(), sort_keys=True, default=str))

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _scaling(params: dict | None) -> dict | None:
    """A rope scaling dict without its theta, or None for the default (unscaled) kind."""
    if not params or params.get("rope_type", params.get("type")) in (None, "default"):
        return None
    return {k: v for k, v in params.items() if k != "rope_theta"}


def _number(x) -> int | float:
    """An int when integral (HF's strict Gemma3TextConfig types query_pre_attn_scalar as int), else a float."""
    x = float(x)
    return int(x) if x.is_integer() else x


def _shape_fields(d: dict, model_type: str, *, head_dim: int | None, tie: bool, max_positions: int) -> dict:
    n_heads = int(d["num_attention_heads"])
    hidden = int(d["hidden_size"])
    return dict(
        model_type=model_type,
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]),
        num_hidden_layers=int(d["num_hidden_layers"]),
        num_attention_heads=n_heads,
        num_key_value_heads=int(d.get("num_key_value_heads") or n_heads),
        head_dim=int(d.get("head_dim") or head_dim or hidden // n_heads),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(d.get("max_position_embeddings", max_positions)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", tie)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
    )


def _llama_fields(d: dict, model_type: str) -> dict:
    # transformers 5 nests theta and scaling in `rope_parameters`; older files keep them top level.
    rope_params = d.get("rope_parameters") or {}
    theta = rope_params.get("rope_theta", d.get("rope_theta", 10000.0))
    scaling = _scaling(d.get("rope_scaling"))
    if rope_params.get("rope_type", "default") != "default":
        scaling = _scaling(rope_params)
    return dict(
        _shape_fields(d, model_type, head_dim=None, tie=False, max_positions=2048),
        rope_theta=float(theta),
        rope_scaling=scaling,
        # Qwen2 always has QKV bias and its config.json carries no flag for it.
        attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
        qk_norm=model_type == "qwen3",
    )


def _gemma3_text_part(d: dict, where: str) -> dict:
    """The text decoder's config inside a `gemma3` (Gemma3ForConditionalGeneration) config.json."""
    if d.get("vision_config") is not None:
        raise ConfigError(f"{where}: a Gemma 3 multimodal checkpoint (vision_config present); only the text "
                          "decoder is supported: use a gemma3_text checkpoint (Gemma3ForCausalLM)")
    text = d.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"{where}: model_type 'gemma3' without a text_config object")
    text = dict(text)
    if "tie_word_embeddings" in d:
        text.setdefault("tie_word_embeddings", d["tie_word_embeddings"])
    return text


def gemma3_layer_types(num_layers: int, pattern: int) -> tuple[str, ...]:
    """HF's default layer pattern: every `pattern`-th layer global, the rest sliding."""
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(num_layers))


def _gemma3_fields(d: dict) -> dict:
    g = GEMMA3_DEFAULTS
    activation = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if activation != "gelu_pytorch_tanh":
        raise ConfigError(f"hidden_activation {activation!r} is not supported (Gemma 3 uses gelu_pytorch_tanh)")
    if d.get("attn_logit_softcapping") is not None:
        raise ConfigError("attn_logit_softcapping is not supported (Gemma 3 has none)")
    if d.get("attention_bias"):
        raise ConfigError("attention_bias=true is not supported for Gemma 3 (it would bias o_proj too)")
    if d.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention=true is not supported (a causal decoder only)")
    # Three spellings: rope_parameters per layer type (transformers 5), one flat rope_parameters, or top-level
    # rope_theta / rope_local_base_freq / rope_scaling (older files). The scaling belongs to the global layers.
    rope = d.get("rope_parameters") or {}
    per_type = FULL in rope or SLIDING in rope
    full = (rope.get(FULL) or {}) if per_type else rope
    local = (rope.get(SLIDING) or {}) if per_type else {}
    if _scaling(local) is not None:
        raise ConfigError(f"rope scaling on sliding_attention layers ({local}) is not supported")
    scaling = _scaling(full) if _scaling(full) is not None else _scaling(d.get("rope_scaling"))
    layer_types = d.get("layer_types")
    num_layers = int(d["num_hidden_layers"])
    window = d.get("sliding_window", g["sliding_window"])
    if layer_types is None:
        pattern = int(d.get("sliding_window_pattern") or g["sliding_window_pattern"])
        layer_types = gemma3_layer_types(num_layers, pattern)
    return dict(
        _shape_fields(d, "gemma3_text", head_dim=g["head_dim"], tie=g["tie_word_embeddings"], max_positions=131072),
        rope_theta=float(full.get("rope_theta", d.get("rope_theta", g["rope_theta"]))),
        rope_scaling=scaling,
        rope_local_theta=float(local.get("rope_theta", d.get("rope_local_base_freq", g["rope_local_base_freq"]))),
        qk_norm=True,
        sliding_window=None if window is None else int(window),
        layer_types=tuple(layer_types),
        query_pre_attn_scalar=_number(d.get("query_pre_attn_scalar", g["query_pre_attn_scalar"])),
        final_logit_softcapping=(None if d.get("final_logit_softcapping") is None
                                 else float(d["final_logit_softcapping"])),
    )

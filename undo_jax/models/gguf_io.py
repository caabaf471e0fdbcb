"""Import GGUF checkpoints (llama.cpp format): config, dequantized weights and tokenizer.

Tensors are dequantized one at a time with the `gguf` package and renamed to HF names, then
placed by `weights.assemble` like any safetensors tensor.
"""

from __future__ import annotations

import re

import numpy as np

from undo_jax.models.config import ModelConfig
from undo_jax.models.decoder import CausalLM
from undo_jax.models.weights import assemble

# GGUF architecture name -> our model_type.
_ARCHES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


class GGUFError(ValueError):
    """A GGUF file we cannot import."""


def _reader(path: str):
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as e:  # the gguf package raises bare ValueErrors/struct errors on bad files
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})".replace("\n", " ")) from None


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def gguf_config(reader, path: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHES:
        raise GGUFError(f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(_ARCHES)}")
    names = {t.name for t in reader.tensors}

    def req(key):
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise GGUFError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    n_heads = int(req("attention.head_count"))
    hidden = int(req("embedding_length"))
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    head_dim = _field(reader, f"{arch}.attention.key_length") or hidden // n_heads
    scaling = None
    if _field(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise GGUFError(f"{path}: GGUF rope scaling is not supported")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        model_type=_ARCHES[arch],
        vocab_size=int(embd.shape[1]),
        hidden_size=hidden,
        intermediate_size=int(req("feed_forward_length")),
        num_hidden_layers=int(req("block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        head_dim=int(head_dim),
        rms_norm_eps=float(req("attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm=arch == "qwen3",
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=None if eos is None else int(eos),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutes Llama q/k rows to its interleaved RoPE; undo it."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str, *, dtype, param_dtype, mesh=None, rules=None) -> CausalLM:
    from gguf import dequantize

    reader = _reader(path)
    config = gguf_config(reader, path)
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        # llama.cpp stores Llama 3.1+ rope scaling only as per-dimension factors; dropping them would
        # silently change every logit, so refuse rather than guess the llama3 parameters back.
        raise GGUFError(f"{path}: GGUF rope_freqs (Llama 3.1+ rope scaling) is not supported; "
                        "load the Hugging Face checkpoint of this model instead")
    tensors = {}
    unknown = []
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            unknown.append(t.name)
            continue
        tensors[name] = t

    def fetch(name):
        t = tensors[name]
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if config.model_type == "llama":
            if name.endswith("q_proj.weight"):
                w = _unpermute_rope(w, config.num_attention_heads)
            elif name.endswith("k_proj.weight"):
                w = _unpermute_rope(w, config.num_key_value_heads)
        return w

    available = set(tensors) | {f"gguf:{n}" for n in unknown}
    return assemble(config, fetch, available, where=path, dtype=dtype, param_dtype=param_dtype,
                    mesh=mesh, rules=rules)


def load_gguf_tokenizer(path: str):
    """The tokenizer described by the GGUF's metadata, with its chat template (built without torch)."""
    from undo_jax.models.gguf_tokenizer import load_gguf_tokenizer as build

    reader = _reader(path)  # validates the file first, for a one-line error
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHES:
        raise GGUFError(f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(_ARCHES)}")
    return build(path, reader)

"""Import GGUF checkpoints (llama.cpp format): config, dequantized weights and tokenizer.

Tensors are dequantized one at a time with the `gguf` package and renamed to HF names, then
placed by `weights.assemble` like any safetensors tensor.

Gemma 3 (architecture `gemma3`): llama.cpp's converter stores the RMSNorm weights as 1 + w, so 1 is
subtracted back (as transformers' own GGUF loader does); the metadata lacks the local RoPE base, the
layer pattern and query_pre_attn_scalar, which take the values llama.cpp itself hard-codes.
"""

from __future__ import annotations

import functools
import os
import re

import numpy as np

from undo_jax.models.config import GEMMA3_DEFAULTS, ModelConfig, gemma3_layer_types
from undo_jax.models.decoder import CausalLM
from undo_jax.models.weights import assemble

# GGUF architecture name -> our model_type.
_ARCHES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# Gemma 3's four norms per block: llama.cpp calls its pre-feedforward norm ffn_norm.
_GEMMA3_LAYER_NAMES = {**_LAYER_NAMES, "ffn_norm": "pre_feedforward_layernorm",
                       "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


class GGUFError(ValueError):
    """A GGUF file we cannot import."""


def _reader(path: str):
    """The file's GGUFReader, shared by the weight and the tokenizer import of one unchanged file: parsing the
    metadata of a 262k-token vocabulary (Gemma 3) takes ~20 s on this CPU, most of a load."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise GGUFError(f"{path}: cannot read the GGUF file ({e.strerror})") from None
    return _cached_reader(os.path.realpath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime_ns: int, size: int):
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


def _hf_name(gguf_name: str, arch: str) -> str | None:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    names = _GEMMA3_LAYER_NAMES if arch == "gemma3" else _LAYER_NAMES
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"
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
    scaling_type = _field(reader, f"{arch}.rope.scaling.type")
    if arch == "gemma3" and scaling_type == "linear":  # Gemma 3 4B+: linear scaling on the global layers
        scaling = {"rope_type": "linear", "factor": float(req("rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise GGUFError(f"{path}: GGUF rope scaling {scaling_type!r} is not supported")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    extra = _gemma3_fields(reader, int(req("block_count")), hidden, n_heads, int(head_dim)) if arch == "gemma3" else {}
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
        qk_norm=arch in ("qwen3", "gemma3"),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=None if eos is None else int(eos),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        **extra,
    )


def _gemma3_fields(reader, num_layers: int, hidden: int, n_heads: int, head_dim: int) -> dict:
    """Gemma 3 settings the GGUF metadata carries (window, optional pattern, softcap) or llama.cpp hard-codes."""
    pattern = _field(reader, "gemma3.attention.sliding_window_pattern", GEMMA3_DEFAULTS["sliding_window_pattern"])
    if isinstance(pattern, list):  # newer converters: one "is sliding" flag per layer
        layer_types = tuple("sliding_attention" if p else "full_attention" for p in pattern)
    else:
        layer_types = gemma3_layer_types(num_layers, int(pattern))
    softcap = _field(reader, "gemma3.final_logit_softcapping")
    return dict(
        sliding_window=int(_field(reader, "gemma3.attention.sliding_window", GEMMA3_DEFAULTS["sliding_window"])),
        layer_types=layer_types,
        rope_local_theta=GEMMA3_DEFAULTS["rope_local_base_freq"],
        # llama.cpp: the 27B model (62 layers) scales by hidden / heads, every other size by head_dim.
        query_pre_attn_scalar=hidden // n_heads if num_layers == 62 else head_dim,
        final_logit_softcapping=None if softcap is None else float(softcap),
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
        name = _hf_name(t.name, _field(reader, "general.architecture"))
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
        if config.is_gemma3 and name.endswith("norm.weight"):
            w = w - 1.0  # stored as the applied scale 1 + w
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

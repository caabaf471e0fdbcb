"""Reference helpers: tiny random transformers models of each family, and logits from both frameworks."""

from __future__ import annotations

import numpy as np

# Small enough to build, save and run in well under a second per family; GQA (4 query heads over 2 KV heads).
TINY = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

# name -> (config class name, kwargs). Together they cover each difference between the families.
KINDS = {
    "llama": ("LlamaConfig", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    "llama3": ("LlamaConfig", {"rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": True}),
    "qwen2_tied": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen2_untied": ("Qwen2Config", {"tie_word_embeddings": False}),
    "qwen3": ("Qwen3Config", {"head_dim": 24}),  # head_dim != hidden_size / heads (16)
}


def make_hf_model(kind: str, seed: int = 0):
    """A transformers model of the tiny shape with every weight (norms and biases too) randomised."""
    import torch
    import transformers

    cls_name, kwargs = KINDS[kind]
    config = getattr(transformers, cls_name)(**TINY, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))  # non-trivial, but near the usual 1
            else:
                p.normal_(0.0, 0.15)
    return model


# Gemma 3, tiny: a window of 8 (shorter than the test sequences), an irregular local/global pattern, its own local
# RoPE base, head_dim != hidden / heads and query_pre_attn_scalar != head_dim, so each Gemma setting is exercised.
GEMMA3_TINY = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24, "query_pre_attn_scalar": 20,
               "sliding_window": 8, "max_position_embeddings": 256,
               "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]}
GEMMA3_ROPE = {
    "default": {"sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 100000.0}},
    # Gemma 3 4B+ style: linear scaling on the global layers only.
    "linear": {"sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
               "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0}},
}


def make_gemma3_model(rope: str = "default", seed: int = 0, **overrides):
    """A tiny transformers Gemma3ForCausalLM with every weight randomised (norm weights w near 0: scale 1 + w)."""
    import torch
    import transformers

    config = transformers.Gemma3TextConfig(**{**GEMMA3_TINY, "rope_parameters": GEMMA3_ROPE[rope], **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.2 if "norm" in name else 0.15)
    return model


def real_questions(shared_data, per_task: int) -> list[str]:
    """The first `per_task` SVAMP and GSM8K test questions of the shared data."""
    import json

    out = []
    with open(shared_data / "svamp" / "svamp.jsonl", encoding="utf-8") as f:
        for line in list(f)[:per_task]:
            r = json.loads(line)
            out.append(f"{r['Body']} {r['Question']}")
    with open(shared_data / "gsm8k" / "test.jsonl", encoding="utf-8") as f:
        out += [json.loads(line)["question"] for line in list(f)[:per_task]]
    return out


def random_batch(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length), dtype=np.int64)


def left_pad_mask(lengths: list[int], total: int) -> np.ndarray:
    """[B, T] int mask with each row's real tokens at the right end."""
    mask = np.zeros((len(lengths), total), np.int64)
    for row, n in enumerate(lengths):
        mask[row, total - n:] = 1
    return mask


def torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None, positions: np.ndarray | None = None):
    import torch

    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(mask)
    if positions is not None:
        kwargs["position_ids"] = torch.as_tensor(positions)
    with torch.no_grad():
        return model(torch.as_tensor(ids), **kwargs).logits.float().numpy()


def jax_logits(model, ids: np.ndarray, mask: np.ndarray | None = None, **kwargs) -> np.ndarray:
    import jax.numpy as jnp

    if mask is not None:
        kwargs["attention_mask"] = jnp.asarray(mask, jnp.int32)
    return np.asarray(model(jnp.asarray(ids, jnp.int32), **kwargs))


# HF tensor-name suffix -> GGUF name (llama.cpp's tensor naming).
_GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
_GGUF_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Llama q/k rows (pairs for its interleaved RoPE)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's converter stores Llama 3 rope scaling as per-frequency divisors in a `rope_freqs` tensor."""
    import math

    base = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for freq in base:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def write_gguf(hf_model, path, *, arch: str | None = None, edit=None) -> None:
    """Write a transformers model as an F32 GGUF file the way llama.cpp's converter lays it out.

    `edit(tensors)` may change the {gguf name: array} dict before it is written (to make bad files).
    """
    import gguf

    cfg = hf_model.config
    arch = arch or cfg.model_type
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    tensors = {}
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        arr = tensor.float().numpy()
        if name in _GGUF_TOP_NAMES:
            gguf_name = _GGUF_TOP_NAMES[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{_GGUF_LAYER_NAMES[module]}.{kind}"
            if arch == "llama" and module == "self_attn.q_proj":
                arr = _llama_cpp_permute(arr, cfg.num_attention_heads)
            elif arch == "llama" and module == "self_attn.k_proj":
                arr = _llama_cpp_permute(arr, cfg.num_key_value_heads)
        tensors[gguf_name] = arr
    rope = cfg.rope_parameters
    if rope.get("rope_type") == "llama3":
        tensors["rope_freqs.weight"] = _llama3_rope_factors(rope, head_dim)
    if edit is not None:
        edit(tensors)
    for gguf_name, arr in tensors.items():
        writer.add_tensor(gguf_name, np.ascontiguousarray(arr))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

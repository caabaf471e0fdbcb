"""Load and save Hugging Face checkpoints (config.json + safetensors), and tokenizers.

No torch at run time: safetensors are read through numpy memory maps (`safetensors_io`).
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from undo_jax.models import safetensors_io
from undo_jax.models.attention import check_backend
from undo_jax.models.config import ModelConfig
from undo_jax.models.decoder import CausalLM, set_attention
from undo_jax.models.weights import assemble, export_tensors

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "fp32": jnp.float32, "bf16": jnp.bfloat16,
           "float16": jnp.float16}
DEFAULT_SHARD_BYTES = 2 * 1024**3
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def as_dtype(name):
    if name is None or not isinstance(name, str):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _is_hub_id(source: str) -> bool:
    return not os.path.exists(source) and source.count("/") == 1 and not source.startswith((".", "/"))


def resolve_source(source: str | os.PathLike) -> str:
    """A local path as given; a hub id is downloaded (config, safetensors, tokenizer) when online."""
    source = os.fspath(source)
    if os.path.exists(source):
        return source
    if _is_hub_id(source):
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
        except Exception as e:  # offline, unknown repo, gated ...
            raise FileNotFoundError(
                f"{source}: not a local path, and the hub download failed ({type(e).__name__})"
            ) from None
    raise FileNotFoundError(f"{source}: no such file or directory")


def load_pretrained(source, *, dtype="float32", param_dtype=None, mesh=None, rules=None,
                    attention: str = "auto") -> CausalLM:
    """Load a student model from a HF directory, a .gguf file or (online) a hub id.

    `dtype` is the compute dtype; `param_dtype` defaults to it. With `mesh`, each tensor is put
    straight onto its sharded placement (rules: `undo_jax.sharding`). `attention`: the backend
    (`undo_jax.models.attention.BACKENDS`).
    """
    check_backend(attention)
    return set_attention(_load(source, dtype, param_dtype, mesh, rules), attention)


def _load(source, dtype, param_dtype, mesh, rules) -> CausalLM:
    path = resolve_source(source)
    compute = as_dtype(dtype)
    params = as_dtype(param_dtype) or compute
    if os.path.isfile(path) and path.endswith(".gguf"):
        from undo_jax.models.gguf_io import load_gguf

        return load_gguf(path, dtype=compute, param_dtype=params, mesh=mesh, rules=rules)
    if os.path.isfile(path):
        raise ValueError(f"{path}: expected a Hugging Face model directory or a .gguf file")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path}: no config.json in this directory (not a Hugging Face checkpoint)")
    config = ModelConfig.from_json_file(config_path)
    files = _safetensors_files(path)
    index: dict[str, tuple[safetensors_io.SafetensorsFile, str]] = {}  # our HF name -> (file, stored name)
    for f in files:
        st = safetensors_io.SafetensorsFile(f)
        for name in st.keys():
            index[_text_decoder_name(name)] = (st, name)
    # Some checkpoints store a redundant lm_head alongside tied embeddings (or rotary buffers).
    ignore = lambda n: n.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and n == "lm_head.weight")  # noqa: E731
    return assemble(config, lambda n: index[n][0][index[n][1]], set(index), where=path, dtype=compute,
                    param_dtype=params, mesh=mesh, rules=rules, ignore=ignore)


# A text-only `gemma3` (Gemma3ForConditionalGeneration) checkpoint nests the decoder under a language_model prefix
# (transformers 5 and 4 spellings); its tensors are the Gemma3ForCausalLM ones.
_WRAPPED_PREFIXES = ("model.language_model.", "language_model.model.")


def _text_decoder_name(name: str) -> str:
    for prefix in _WRAPPED_PREFIXES:
        if name.startswith(prefix):
            return "model." + name[len(prefix):]
    if name.startswith("language_model.lm_head."):
        return name[len("language_model."):]
    return name


def _safetensors_files(path: str) -> list[str]:
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted({os.path.join(path, v) for v in weight_map.values()})
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"{index_path}: lists shard files that are missing: {', '.join(missing)}")
        return files
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def save_pretrained(model: CausalLM, out_dir, tokenizer=None, *, dtype=None, max_shard_bytes=DEFAULT_SHARD_BYTES):
    """Write config.json, safetensors (sharded above `max_shard_bytes`) and the tokenizer.

    Written into a temporary sibling folder and renamed into place at the end: `out_dir` is
    never left half-written, and an existing non-empty `out_dir` is refused.
    """
    with safetensors_io.staged_dir(out_dir) as tmp:
        np_dtype = None if dtype is None else np.dtype(as_dtype(dtype))
        dtype_name = str(np_dtype or np.dtype(model.param_dtype))
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        weight_map = {}
        for name, arr in export_tensors(model, dtype=np_dtype):
            if size and size + arr.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = arr
            size += arr.nbytes
        if len(shards) == 1:
            safetensors_io.write_file(os.path.join(tmp, "model.safetensors"), shards[0])
        else:
            total = 0
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                safetensors_io.write_file(os.path.join(tmp, fname), shard)
                for name, arr in shard.items():
                    weight_map[name] = fname
                    total += arr.nbytes
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(model.config.to_hf_dict(dtype=dtype_name), f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return os.fspath(out_dir)


def load_tokenizer(source):
    """A transformers tokenizer (with its chat template) for a HF directory, a .gguf file or a hub id."""
    from transformers import AutoTokenizer

    path = resolve_source(source)
    if os.path.isfile(path) and path.endswith(".gguf"):
        from undo_jax.models.gguf_io import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path}: expected a Hugging Face model directory or a .gguf file")
    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{path}: no tokenizer in this directory (none of {', '.join(_TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:  # transformers' messages span lines and may not name the folder
        first = " ".join(str(e).split())
        raise ValueError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {first})") from None

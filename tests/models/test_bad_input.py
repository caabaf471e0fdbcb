"""Broken Hugging Face checkpoints: each gives one clear line naming the file (GGUF cases are in test_gguf.py)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from undo_jax.models import load_pretrained, load_tokenizer
from undo_jax.models.safetensors_io import SafetensorsFile, write_file


@pytest.fixture
def checkpoint(hf_checkpoint, tmp_path):
    """A writable copy of a tiny transformers-saved checkpoint."""
    _, src = hf_checkpoint("qwen2_untied")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _error(path_named, exc=ValueError, match=None, *, source=None) -> str:
    with pytest.raises(exc, match=match) as err:
        load_pretrained(source if source is not None else path_named)
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert str(path_named) in msg, msg
    return msg


def test_directory_without_config(checkpoint):
    os.remove(checkpoint / "config.json")
    _error(checkpoint, FileNotFoundError, "no config.json")


def test_missing_path(tmp_path):
    _error(tmp_path / "nowhere", FileNotFoundError, "no such file or directory")


def test_unsupported_model_type(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps(config | {"model_type": "gpt2"}))
    _error(checkpoint / "config.json", ValueError, "unsupported model_type 'gpt2'", source=checkpoint)


def test_no_weights(checkpoint):
    os.remove(checkpoint / "model.safetensors")
    _error(checkpoint, FileNotFoundError, "no model.safetensors")


@pytest.mark.parametrize("keep", [4, 60, -100])
def test_truncated_safetensors(checkpoint, keep):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    _error(path, ValueError, "truncated safetensors file", source=checkpoint)


def test_corrupt_safetensors_header(checkpoint):
    path = checkpoint / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff" * 8  # inside the JSON header
    path.write_bytes(bytes(data))
    _error(path, ValueError, "corrupt safetensors header", source=checkpoint)


def test_missing_unexpected_and_misshaped_tensors_in_one_error(checkpoint):
    path = checkpoint / "model.safetensors"
    st = SafetensorsFile(str(path))
    tensors = {name: np.array(st[name]) for name in st.keys()}
    del st
    del tensors["model.layers.1.mlp.down_proj.weight"]
    del tensors["model.norm.weight"]
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
    tensors["model.layers.0.self_attn.k_proj.bias"] = np.zeros(5, np.float32)
    write_file(str(path), tensors)
    msg = _error(checkpoint, ValueError, "weights do not match the config")
    for name in ("missing tensor model.layers.1.mlp.down_proj.weight", "missing tensor model.norm.weight",
                 "unexpected tensor model.layers.0.self_attn.extra.weight",
                 "tensor model.layers.0.self_attn.k_proj.bias has shape (5,)"):
        assert name in msg, msg
    assert "(4 problems)" in msg


def test_index_naming_missing_shard(checkpoint):
    os.rename(checkpoint / "model.safetensors", checkpoint / "model-00001-of-00002.safetensors")
    st = SafetensorsFile(str(checkpoint / "model-00001-of-00002.safetensors"))
    names = sorted(st.keys())
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
    weight_map[names[0]] = "model-00002-of-00002.safetensors"
    index = checkpoint / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    msg = _error(index, FileNotFoundError, "missing", source=checkpoint)
    assert "model-00002-of-00002.safetensors" in msg


def test_plain_file_is_refused(checkpoint):
    _error(checkpoint / "config.json", ValueError, "expected a Hugging Face model directory or a .gguf file")


def test_tokenizer_missing_from_directory(checkpoint):
    with pytest.raises(FileNotFoundError, match="no tokenizer") as err:
        load_tokenizer(checkpoint)
    assert "\n" not in str(err.value) and str(checkpoint) in str(err.value)


def test_unreadable_tokenizer_names_directory(checkpoint):
    (checkpoint / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="cannot load the tokenizer") as err:
        load_tokenizer(checkpoint)
    assert "\n" not in str(err.value) and str(checkpoint) in str(err.value)

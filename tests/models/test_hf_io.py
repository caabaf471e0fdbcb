"""HF -> undo_jax -> HF: save_pretrained output is loaded by transformers itself and gives the same logits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from tests.models.reference import KINDS, jax_logits, left_pad_mask, random_batch, torch_logits
from undo_jax.models import load_pretrained, save_pretrained
from undo_jax.models.safetensors_io import SafetensorsFile


def _hf_tensors(path) -> dict[str, np.ndarray]:
    """All tensors of a (possibly sharded) checkpoint directory, read with the reference safetensors library."""
    from safetensors.numpy import load_file

    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_export_loads_in_transformers_with_equal_logits(kind, hf_checkpoint, tmp_path):
    hf_model, path = hf_checkpoint(kind)
    out = save_pretrained(load_pretrained(path), tmp_path / "export")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]

    # Bit-identical tensors under the same names (tied checkpoints: transformers drops lm_head on save too).
    original, exported = _hf_tensors(path), _hf_tensors(out)
    assert sorted(exported) == sorted(original)
    for name, arr in original.items():
        np.testing.assert_array_equal(exported[name], arr, err_msg=name)

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded) is type(hf_model)
    ids = random_batch(2, 13, 128, seed=4)
    mask = left_pad_mask([13, 6], 13)
    valid = mask.astype(bool)
    np.testing.assert_array_equal(torch_logits(reloaded, ids, mask)[valid], torch_logits(hf_model, ids, mask)[valid])


def test_sharded_export_with_index(hf_checkpoint, tmp_path):
    hf_model, path = hf_checkpoint("qwen2_untied")
    model = load_pretrained(path)
    out = Path(save_pretrained(model, tmp_path / "sharded", max_shard_bytes=40_000))
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) > 3
    assert all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    for f in files:  # every shard but an oversized single tensor stays under the limit
        st = SafetensorsFile(os.path.join(out, f))
        sizes = [st[n].nbytes for n in st.keys()]
        assert len(sizes) == 1 or sum(sizes) <= 40_000, f
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = _hf_tensors(out)
    assert set(index["weight_map"]) == set(tensors) == set(_hf_tensors(path))
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())

    ids = random_batch(2, 11, 128, seed=5)
    ref = torch_logits(hf_model, ids)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_array_equal(torch_logits(reloaded, ids), ref)
    # And our own loader reads the sharded form back.
    assert np.abs(jax_logits(load_pretrained(out), ids) - ref).max() <= 1e-4


def test_bf16_export(hf_checkpoint, tmp_path):
    hf_model, path = hf_checkpoint("qwen3")
    out = Path(save_pretrained(load_pretrained(path), tmp_path / "bf16", dtype="bfloat16"))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    for name, arr in hf_model.state_dict().items():
        np.testing.assert_array_equal(
            reloaded.state_dict()[name].float().numpy(), arr.to(torch.bfloat16).float().numpy(), err_msg=name
        )


def test_export_refuses_non_empty_directory_and_leaves_no_temp(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint("llama")
    model = load_pretrained(path)
    target = tmp_path / "existing"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="existing"):
        save_pretrained(model, target)
    assert (target / "keep.txt").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    save_pretrained(model, tmp_path / "empty")  # an empty directory is fine
    assert sorted(os.listdir(tmp_path)) == ["empty", "existing"]  # no .tmp-export-* left behind


def test_export_from_bf16_params_keeps_dtype(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint("llama3")
    model = load_pretrained(path, dtype="bfloat16")
    out = Path(save_pretrained(model, tmp_path / "out"))
    st = SafetensorsFile(str(out / "model.safetensors"))
    assert {st.header[n]["dtype"] for n in st.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

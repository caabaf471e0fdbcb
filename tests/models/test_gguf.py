"""GGUF -> undo_jax -> HF on tiny F32 GGUF files laid out the way llama.cpp's converter writes them."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import transformers

from tests.models.reference import jax_logits, left_pad_mask, make_hf_model, random_batch, torch_logits, write_gguf
from undo_jax.models import load_pretrained, load_tokenizer, save_pretrained

GGUF_KINDS = ["llama", "qwen2_tied", "qwen2_untied", "qwen3"]


@pytest.fixture(scope="module")
def gguf_checkpoint(tmp_path_factory):
    cache = {}

    def get(kind):
        if kind not in cache:
            model = make_hf_model(kind, seed=7)
            folder = tmp_path_factory.mktemp(f"gguf_{kind}")
            write_gguf(model, folder / "model.gguf")
            cache[kind] = (model, folder / "model.gguf")
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", GGUF_KINDS)
def test_gguf_import_and_hf_export(kind, gguf_checkpoint, tmp_path):
    hf_model, path = gguf_checkpoint(kind)
    model = load_pretrained(path)
    ids = random_batch(2, 15, 128, seed=8)
    mask = left_pad_mask([15, 8], 15)
    valid = mask.astype(bool)
    ref = torch_logits(hf_model, ids, mask)
    diff = np.abs(jax_logits(model, ids, mask) - ref)[valid].max()
    assert diff <= 1e-4, f"{kind}: GGUF import differs from the source model by {diff:.3g}"

    # Export to HF: transformers loads it, and the tensors are exactly the ones the GGUF was written from
    # (so the llama q/k row permutation was undone exactly).
    out = save_pretrained(model, tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for name, tensor in hf_model.state_dict().items():
        np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), tensor.numpy(), err_msg=name)
    np.testing.assert_array_equal(torch_logits(reloaded, ids, mask)[valid], ref[valid])


@pytest.mark.parametrize("kind", ["llama", "qwen2_untied"])
def test_gguf_import_matches_transformers_gguf_loader(kind, gguf_checkpoint):
    # transformers' own GGUF reader (it ignores key_length, so qwen3 with head_dim != hidden/heads is left out).
    _, path = gguf_checkpoint(kind)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = random_batch(2, 10, 128, seed=9)
    diff = np.abs(jax_logits(load_pretrained(path), ids) - torch_logits(theirs, ids)).max()
    assert diff <= 1e-4, f"{kind}: {diff:.3g}"


def test_llama3_rope_scaling_in_gguf_is_refused(gguf_checkpoint):
    # llama.cpp keeps Llama 3.1/3.2 rope scaling only as a `rope_freqs` tensor (no metadata key); loading it
    # without the factors would silently change every logit, so the loader refuses such files in one line.
    _, path = gguf_checkpoint("llama3")
    with pytest.raises(ValueError, match="rope_freqs") as e:
        load_pretrained(path)
    _one_line_error(e, path)


def _one_line_error(exc_info, path) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    return msg


def test_unknown_gguf_architecture(tmp_path):
    import gguf

    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'mamba'") as err:
        load_pretrained(path)
    _one_line_error(err, path)
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'mamba'") as err:
        load_tokenizer(path)
    _one_line_error(err, path)


def test_truncated_gguf(gguf_checkpoint, tmp_path):
    _, good = gguf_checkpoint("qwen3")
    data = good.read_bytes()
    for keep in (len(data) // 2, 100):
        path = tmp_path / f"cut{keep}.gguf"
        path.write_bytes(data[:keep])
        with pytest.raises(ValueError) as err:
            load_pretrained(path)
        _one_line_error(err, path)


def test_gguf_with_wrong_tensors_lists_all(gguf_checkpoint, tmp_path):
    hf_model, _ = gguf_checkpoint("qwen2_untied")
    path = tmp_path / "bad.gguf"

    def spoil(tensors):  # one tensor dropped, one unknown added, one of the wrong shape
        del tensors["blk.1.ffn_up.weight"]
        tensors["blk.0.mystery.weight"] = np.zeros((4,), np.float32)
        tensors["blk.0.attn_v.weight"] = tensors["blk.0.attn_v.weight"][:-1]

    write_gguf(hf_model, path, edit=spoil)
    with pytest.raises(ValueError) as err:
        load_pretrained(path)
    msg = _one_line_error(err, path)
    assert "model.layers.1.mlp.up_proj.weight" in msg
    assert "mystery" in msg
    assert "model.layers.0.self_attn.v_proj.weight" in msg


def test_gguf_file_not_named_gguf_is_refused(gguf_checkpoint, tmp_path):
    _, good = gguf_checkpoint("llama")
    path = tmp_path / "model.bin"
    os.link(good, path)
    with pytest.raises(ValueError, match="expected a Hugging Face model directory or a .gguf file") as err:
        load_pretrained(path)
    _one_line_error(err, path)

"""Gemma 3 (text decoder) vs transformers' Gemma3ForCausalLM on tiny random checkpoints, fp32.

Sequences are longer than the sliding window (8) and left-padded, so local layers, their RoPE base,
the global layers' (linearly scaled) RoPE and the padding all show in the logits.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from tests.models.reference import jax_logits, left_pad_mask, random_batch, torch_logits
from undo_jax.models import ModelConfig, load_pretrained, save_pretrained
from undo_jax.models.config import ConfigError
from undo_jax.models.safetensors_io import SafetensorsFile, write_file

TOLERANCE = 1e-4  # max |logit difference|, fp32
LENGTH = 40  # five windows


@pytest.fixture
def gemma3_checkpoint(hf_checkpoint):
    """rope kind -> (torch model, directory saved by transformers), built once per session."""
    return lambda rope: hf_checkpoint(f"gemma3_{rope}")


@pytest.mark.parametrize("rope", ["default", "linear"])
def test_logits_match_transformers_past_the_window(rope, gemma3_checkpoint):
    hf_model, path = gemma3_checkpoint(rope)
    ids = random_batch(3, LENGTH, 128, seed=1)
    mask = left_pad_mask([LENGTH, 29, 11], LENGTH)
    valid = mask.astype(bool)
    ref = torch_logits(hf_model, ids, mask)
    assert np.abs(ref).max() > 1.0  # logits large enough for the tolerance to mean something
    for scan in (True, False):
        model = load_pretrained(path)
        model.scan_layers = scan
        assert model.config.local_layers == (True, True, False, True)
        ours = jax_logits(model, ids, mask)
        assert np.isfinite(ours).all()
        diff = np.abs(ours - ref)[valid].max()
        assert diff <= TOLERANCE, f"rope={rope} scan={scan}: max |logit diff| {diff:.3g}"
    # The window and the local base are really exercised: without them the logits move.
    model.config = model.config.replace(layer_types=("full_attention",) * 4)
    assert np.abs(jax_logits(model, ids, mask) - ref)[valid].max() > 1e-2


@pytest.mark.parametrize("backend", ["reference", "xla"])
def test_other_attention_backends_match(backend, gemma3_checkpoint):
    hf_model, path = gemma3_checkpoint("linear")
    ids = random_batch(2, LENGTH, 128, seed=3)
    mask = left_pad_mask([LENGTH, 17], LENGTH)
    ref = torch_logits(hf_model, ids, mask)
    ours = jax_logits(load_pretrained(path, attention=backend), ids, mask)
    assert np.abs(ours - ref)[mask.astype(bool)].max() <= TOLERANCE


def test_chunked_gradients_equal_reference(gemma3_checkpoint):
    """The chunked backend's custom VJP takes the (per-layer, traced) window as an operand: same gradients."""
    _, path = gemma3_checkpoint("default")
    ids = jnp.asarray(random_batch(2, 24, 128, seed=4), jnp.int32)  # three windows
    weights = jax.random.normal(jax.random.key(0), (2, 24, 128))

    def grads(backend):
        model = load_pretrained(path, attention=backend)

        def loss(m):
            return jnp.sum(m(ids) * weights)

        return jax.tree.leaves(nnx.state(nnx.grad(loss)(model), nnx.Param))

    for a, b in zip(grads("chunked"), grads("reference"), strict=True):
        scale = float(jnp.abs(b).max())
        assert float(jnp.abs(a - b).max()) <= 1e-5 * max(scale, 1.0)


def test_export_loads_in_transformers_with_equal_logits(gemma3_checkpoint, tmp_path):
    from safetensors.numpy import load_file

    hf_model, path = gemma3_checkpoint("linear")
    out = save_pretrained(load_pretrained(path), tmp_path / "export")
    original, exported = load_file(os.path.join(path, "model.safetensors")), load_file(
        os.path.join(out, "model.safetensors"))
    assert sorted(exported) == sorted(original)  # norms stored as w (applied as 1 + w), as HF stores them
    for name, arr in original.items():
        np.testing.assert_array_equal(exported[name], arr, err_msg=name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded) is type(hf_model)
    assert reloaded.config.layer_types == hf_model.config.layer_types
    assert reloaded.config.rope_parameters == hf_model.config.rope_parameters
    ids = random_batch(2, LENGTH, 128, seed=5)
    mask = left_pad_mask([LENGTH, 23], LENGTH)
    valid = mask.astype(bool)
    np.testing.assert_array_equal(torch_logits(reloaded, ids, mask)[valid], torch_logits(hf_model, ids, mask)[valid])


def test_config_spellings_agree(gemma3_checkpoint):
    """transformers-5 per-layer-type rope_parameters == the older top-level keys (+ sliding_window_pattern)."""
    _, path = gemma3_checkpoint("linear")
    new = json.loads((path / "config.json").read_text())
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=100000.0, rope_local_base_freq=1000.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
               num_hidden_layers=4, sliding_window_pattern=3)
    a, b = ModelConfig.from_hf_dict(new), ModelConfig.from_hf_dict(old)
    assert a.rope_scaling == b.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert (a.rope_theta, a.rope_local_theta, a.attention_scale) == (100000.0, 1000.0, 20 ** -0.5)
    assert b.layer_types == ("sliding_attention", "sliding_attention", "full_attention", "sliding_attention")
    assert a == b
    assert a.final_logit_softcapping is None and a.tie_word_embeddings


def test_text_only_gemma3_wrapper_loads_its_text_part(gemma3_checkpoint, tmp_path):
    """A `gemma3` config.json without a vision tower: its text_config and language_model.* tensors."""
    hf_model, path = gemma3_checkpoint("default")
    text = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text,
                                                      "architectures": ["Gemma3ForConditionalGeneration"]}))
    st = SafetensorsFile(path / "model.safetensors")
    write_file(tmp_path / "model.safetensors",
               {n.replace("model.", "model.language_model.", 1): np.asarray(st[n]) for n in st.keys()})
    ids = random_batch(1, LENGTH, 128, seed=6)
    diff = np.abs(jax_logits(load_pretrained(tmp_path), ids) - torch_logits(hf_model, ids)).max()
    assert diff <= TOLERANCE


@pytest.mark.parametrize("edit, match", [
    (lambda c: {**c, "model_type": "gemma2"}, "'gemma2' .*not supported"),
    (lambda c: {"model_type": "gemma3", "text_config": c, "vision_config": {"model_type": "siglip_vision_model"}},
     "multimodal checkpoint .vision_config present"),
    (lambda c: {**c, "attn_logit_softcapping": 50.0}, "attn_logit_softcapping is not supported"),
    (lambda c: {**c, "layer_types": ["sliding_attention"] * 3}, "layer_types must name"),
])
def test_unsupported_gemma_configs_are_one_line_errors(edit, match, gemma3_checkpoint, tmp_path):
    _, path = gemma3_checkpoint("default")
    shutil.copytree(path, tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "config.json"
    config_path.write_text(json.dumps(edit(json.loads(config_path.read_text()))))
    with pytest.raises(ConfigError, match=match) as err:
        load_pretrained(tmp_path / "ckpt")
    msg = str(err.value)
    assert "\n" not in msg and str(config_path) in msg, msg


@pytest.mark.parametrize("backend", ["chunked", "xla", pytest.param("tpu_interpret", marks=pytest.mark.slow)])
def test_traced_window_switch_equals_static_window(backend):
    """attention(window_active=traced flag) == a static window when on, == no window when off."""
    from undo_jax.models.attention import attention

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 20, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 2, 20, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 2, 20, 8)), jnp.float32)
    pos = jnp.asarray(np.tile(np.arange(20, dtype=np.int32), (2, 1)))
    kw = dict(q_positions=pos, kv_positions=pos)
    switched = jax.jit(lambda active: attention(q, k, v, backend=backend, block_size=8, sliding_window=5,
                                                window_active=active, **kw))
    local = np.asarray(attention(q, k, v, backend="reference", sliding_window=5, **kw))
    full = np.asarray(attention(q, k, v, backend="reference", **kw))
    assert np.abs(local - full).max() > 1e-3
    np.testing.assert_allclose(np.asarray(switched(jnp.bool_(True))), local, atol=1e-5)
    np.testing.assert_allclose(np.asarray(switched(jnp.bool_(False))), full, atol=1e-5)

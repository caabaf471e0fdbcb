"""LoRA / QLoRA on the decoder: zero adapters change nothing, quantised bases stay close, exports load in
transformers and peft with equal logits, bad settings are one-line errors naming the flag."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.train.helpers import tiny_model
from undo_jax.models import lora
from undo_jax.models.lora import LoRAError, LoRASettings, apply_lora, merged_model
from undo_jax.models.peft_io import save_peft_adapter

IDS = np.random.default_rng(0).integers(0, 128, size=(2, 12)).astype(np.int32)


@nnx.jit
def logits_of(model, ids):
    return model(ids)


def lora_model(seed=1, *, base_dtype="float32", rank=4, alpha=8.0, targets=tuple(lora.TARGETS), random_b=False,
               **overrides):
    model = apply_lora(tiny_model(seed=seed, **overrides), LoRASettings(rank, alpha, targets, base_dtype), seed=3)
    if random_b:  # B = 0 makes every adapter a no-op; a trained one is not
        for i, (_, group_name, proj, _) in enumerate((t, *v) for t, v in lora.TARGETS.items()):
            adapter = getattr(model.layers, group_name).get(proj + lora.ADAPTER_SUFFIX)
            if adapter is not None:
                adapter.b[...] = 0.05 * jax.random.normal(jax.random.key(i), adapter.b[...].shape)
    return model


def test_zero_initialised_adapters_leave_logits_bit_identical():
    base = np.asarray(logits_of(tiny_model(seed=1), IDS))
    assert np.array_equal(np.asarray(logits_of(lora_model(), IDS)), base)  # a subset of targets: the export test
    # The decode path (what the sampler runs) too.
    @nnx.jit
    def prefill(model, ids):
        pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
        return model.prefill_hidden(ids, pos, model.init_cache(2, 16), jnp.ones((2, 12), bool))

    hidden, cache = prefill(lora_model(), IDS)
    ref_hidden, ref_cache = prefill(tiny_model(seed=1), IDS)
    assert np.array_equal(np.asarray(hidden), np.asarray(ref_hidden))
    assert np.array_equal(np.asarray(cache.k), np.asarray(ref_cache.k))


def _dense_reference(model, dequantized):
    """A plain model whose projections are the given dense weights (the rest from `model`)."""
    plain = tiny_model(seed=1)
    for group_name, proj, _ in lora.TARGETS.values():
        getattr(plain.layers, group_name)[proj][...] = dequantized[proj]
    return plain


# Stated tolerances, max |logit diff| / max |logit| against the float32 base, on this tiny random model:
# bfloat16 rounds each weight by <= 2^-9 relative; int8 per-channel absmax errs <= absmax/254 per weight
# (<= 0.4% of the channel's largest); NF4's 16 levels err up to half its widest gap, 0.139 of the block's
# absmax: a 4-bit code, so logits move by several percent. Measured: bf16 0.1%, int8 0.35%, nf4 9%.
QUANT_TOLERANCE = {"bfloat16": 0.01, "int8": 0.01, "nf4": 0.15}


@pytest.mark.parametrize("base_dtype", ["bfloat16", "int8", "nf4"])
def test_quantised_base_logits_within_stated_tolerance(base_dtype):
    base_model = tiny_model(seed=1)
    base = np.asarray(logits_of(base_model, IDS))
    model = lora_model(base_dtype=base_dtype)
    logits = np.asarray(logits_of(model, IDS))
    rel = np.abs(logits - base).max() / np.abs(base).max()
    assert rel <= QUANT_TOLERANCE[base_dtype], rel
    assert rel > 0  # the base really is stored lower-precision
    dequantized = {}
    for group_name, proj, _ in lora.TARGETS.values():
        w = np.asarray(getattr(base_model.layers, group_name)[proj][...])
        stored = getattr(model.layers, group_name)[proj]
        deq = np.asarray(lora.weight(getattr(model.layers, group_name), proj, jnp.float32))
        dequantized[proj] = deq
        err = np.abs(deq - w)
        if base_dtype == "int8":  # half a step of the per-output-channel scale
            scale = np.asarray(stored.scale[...])
            assert np.all(err <= scale / 2 * (1 + 1e-6) + 1e-12), proj
            assert stored.codes[...].dtype == jnp.int8
        elif base_dtype == "nf4":  # half the widest gap of the code times each block's absmax
            flat = np.pad(w.reshape(w.shape[0], -1), ((0, 0), (0, (-w[0].size) % 64))).reshape(w.shape[0], -1, 64)
            absmax = np.abs(flat).max(-1, keepdims=True)
            bound = np.broadcast_to(absmax * np.diff(lora.NF4_CODE).max() / 2, flat.shape)
            bound = bound.reshape(w.shape[0], -1)[:, :w[0].size].reshape(w.shape)
            assert np.all(err <= bound * (1 + 1e-6)), proj
            assert stored.codes[...].dtype == jnp.uint8 and stored.codes[...].size * 2 >= w.size
        else:
            assert np.all(err <= np.abs(w) * 2.0 ** -8), proj
    # The layer scan dequantises exactly what a dense model holding the dequantised weights computes.
    dense = np.asarray(logits_of(_dense_reference(model, dequantized), IDS))
    np.testing.assert_allclose(logits, dense, rtol=0, atol=1e-5)


def hf_logits(path, ids, adapter=None):
    """transformers float32 logits of a HF folder (with a PEFT adapter folder on top)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        hf = PeftModel.from_pretrained(hf, adapter)
    with torch.no_grad():
        return hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def test_merged_and_peft_exports_load_with_equal_logits(tmp_path):
    pytest.importorskip("peft")
    from undo_jax.models import save_pretrained
    from undo_jax.models.safetensors_io import SafetensorsFile

    base = tiny_model(seed=1)
    save_pretrained(base, tmp_path / "base")
    model = lora_model(random_b=True, targets=("q", "o", "gate", "down"))
    ours = np.asarray(logits_of(model, IDS))
    assert np.abs(ours - np.asarray(logits_of(base, IDS))).max() > 1e-3  # the adapters matter

    save_pretrained(merged_model(model), tmp_path / "merged")
    np.testing.assert_allclose(hf_logits(tmp_path / "merged", IDS), ours, rtol=0, atol=1e-4)
    # The merged tensors are W + scale * B A in torch's layout, from the PEFT tensors of the same adapters.
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    merged, w, ab = (SafetensorsFile(str(tmp_path / p)) for p in
                     ("merged/model.safetensors", "base/model.safetensors", "adapter/adapter_model.safetensors"))
    for name in ("model.layers.1.self_attn.o_proj", "model.layers.0.mlp.gate_proj", "model.layers.1.self_attn.k_proj"):
        pre = f"base_model.model.{name}"
        delta = (ab[pre + ".lora_B.weight"] @ ab[pre + ".lora_A.weight"] * 2.0 if pre + ".lora_A.weight" in ab.keys()
                 else 0.0)
        np.testing.assert_allclose(merged[name + ".weight"], w[name + ".weight"] + delta, rtol=0, atol=1e-6)
    np.testing.assert_allclose(hf_logits(tmp_path / "base", IDS, adapter=tmp_path / "adapter"), ours, rtol=0,
                               atol=1e-4)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        save_peft_adapter(model, tmp_path / "adapter")


def test_only_projections_become_frozen_storage():
    model = lora_model(base_dtype="int8")
    trainable = nnx.state(model, lora.trainable_filter(model)).to_pure_dict()
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]}
    assert names and all("_lora" in n for n in names)
    assert lora.lora_settings_of(model) == LoRASettings(4, 8.0, tuple(lora.TARGETS), "int8")


def test_bad_settings_are_one_line_errors_naming_the_flag():
    from undo_jax.config import LORA_BASE_DTYPES, LORA_TARGETS, run_config
    from undo_jax.configtree import ConfigError

    assert LORA_TARGETS == tuple(lora.TARGETS) and LORA_BASE_DTYPES == lora.BASE_DTYPES
    cases = [(dict(lora_rank=4, lora_targets="q,lm_head"), "--lora_targets: unknown target 'lm_head'"),
             (dict(lora_rank=-1), "--lora_rank: must be >= 0"),
             (dict(lora_rank=4, lora_base_dtype="fp8"), "--lora_base_dtype: must be one of"),
             (dict(lora_base_dtype="nf4"), "--lora_base_dtype: nf4 \\(QLoRA\\) needs --lora_rank > 0"),
             (dict(export_peft=True), "--export_peft: needs --lora_rank > 0")]
    for settings, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            run_config(run_dir="r", student="s", **settings)
        assert "\n" not in str(info.value)
    for kwargs, message in [(dict(rank=-2, alpha=1.0), "--lora_rank: must be >= 0"),
                            (dict(rank=2, alpha=1.0, base_dtype="int4"), "--lora_base_dtype: unknown 'int4'"),
                            (dict(rank=2, alpha=1.0, targets=("qkv",)), "--lora_targets: unknown target 'qkv'")]:
        with pytest.raises(LoRAError, match=message):
            LoRASettings(**kwargs)
    # A target the model does not have (a decoder without an MLP gate) names the flag.
    model = tiny_model(seed=0)
    del model.layers.mlp["gate_proj"]
    with pytest.raises(LoRAError, match="--lora_targets: this model has no gate_proj for target 'gate'"):
        apply_lora(model, LoRASettings(2, 4.0, ("q", "gate")))

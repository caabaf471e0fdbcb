"""A QLoRA student through the UNDO loop: trained, evaluated and sampled as is, checkpoints of adapters only,
exported merged (transformers) and as a PEFT adapter folder (peft)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.models.test_lora import hf_logits
from tests.undo.conftest import tiny_config
from undo_jax.undo import RunDir, load_student, run


def test_qlora_student_trains_evaluates_and_exports(tiny_student, tmp_path):
    pytest.importorskip("peft")
    from undo_jax.models.lora import has_lora, lora_settings_of

    run_dir = tmp_path / "lora"
    cfg = tiny_config(run_dir, tiny_student, lora_rank=4, lora_alpha=8.0, lora_targets="q,v,o,up,down",
                      lora_base_dtype="int8", export_peft=True, lr=1e-2, max_iterations=1,
                      keep_train_state="none")
    run(cfg)
    rd = RunDir(run_dir)
    meta = json.loads((run_dir / "iter_1" / "checkpoint" / "model.json").read_text())  # pruned to params-only
    assert meta["param_shapes"] and all("_lora" in k for k in meta["param_shapes"])
    assert meta["base"]["source"] == str(tiny_student) and meta["base"]["lora"]["base_dtype"] == "int8"
    metrics = [json.loads(line) for line in rd.metrics_path.read_text().splitlines()]
    assert {m["iteration"] for m in metrics} >= {0, 1}  # the base and the LoRA student were evaluated (sampled)

    best = json.loads((run_dir / "final" / "undo_export.json").read_text())["iteration"]
    model, _ = load_student(str(run_dir / f"iter_{best}"))
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(2, 9)).astype(np.int32)
    ours = np.asarray(model(ids))
    if best > 0:
        assert has_lora(model) and lora_settings_of(model).base_dtype == "int8"
        assert np.abs(ours - np.asarray(load_student(str(tiny_student))[0](ids))).max() > 1e-4  # it learned
    # The merged export is exactly the QLoRA student (its dequantised base plus the adapters).
    np.testing.assert_allclose(hf_logits(run_dir / "final", ids), ours, rtol=0, atol=1e-4)
    # The PEFT folder goes onto the full-precision base: equal up to the int8 rounding of the base.
    peft_logits = hf_logits(tiny_student, ids, adapter=run_dir / "final" / "peft_adapter")
    assert np.abs(peft_logits - ours).max() <= 0.01 * np.abs(ours).max()

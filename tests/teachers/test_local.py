"""The local teacher: SmolLM2-135M-Instruct (GGUF) through the undo_jax sampler, then from the cache."""

from __future__ import annotations

import pytest

from undo_jax.teachers import TeacherRequest, make_teacher


def _require_stack():
    models = pytest.importorskip("undo_jax.models")
    sampling = pytest.importorskip("undo_jax.sampling")
    if not hasattr(models, "load_pretrained") or not hasattr(sampling, "generate"):
        pytest.skip("undo_jax.models.load_pretrained / undo_jax.sampling.generate not available yet")


@pytest.mark.slow
def test_local_teacher_answers_with_smollm2_then_serves_the_cache(smollm2_gguf, tmp_path):
    _require_stack()
    cache = tmp_path / "cache.sqlite"
    requests = [
        TeacherRequest([{"role": "user", "content": "What is 2 + 3? Answer briefly."}], max_output_tokens=12),
        TeacherRequest(
            [
                {"role": "system", "content": "You are a helpful teacher."},
                {"role": "user", "content": "Name a prime number."},
            ],
            max_output_tokens=12,
        ),
    ]
    first_teacher = make_teacher("local", model_path=smollm2_gguf, cache_path=str(cache))
    first = first_teacher.generate(requests)
    for r in first:
        assert r.error is None and len(r.texts) == 1 and r.texts[0].strip(), r
        assert r.finish_reasons[0] in ("eos", "stop", "length") and not r.cached
        assert r.usage["input_tokens"] > 5 and 0 < r.usage["output_tokens"] <= 12
    # The sampler called directly on the same weights gives the same greedy text.
    from undo_jax.sampling import generate

    direct = generate(first_teacher._lm, first_teacher._tokenizer, [requests[0].messages], max_new_tokens=12)
    assert direct[0][0].text == first[0].texts[0]
    first_teacher.close()
    second_teacher = make_teacher("local", model_path=smollm2_gguf, cache_path=str(cache))
    second = second_teacher.generate(requests)
    assert second_teacher._lm is None  # served from the cache without loading the model
    ledger = second_teacher.ledger.to_dict()
    second_teacher.close()
    assert [r.cached for r in second] == [True, True]
    assert [r.texts for r in second] == [r.texts for r in first]
    assert ledger[f"local/{second_teacher.model}"]["cache_hits"] == 2

"""Sampling is right: temperature-1 draws follow softmax(logits); top-k / top-p never emit excluded tokens."""

from __future__ import annotations

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.sampling.conftest import tiny_model
from undo_jax.sampling import SamplingSettings, filter_logits, generate
from undo_jax.sampling.generate import render_prompts
from undo_jax.sampling.sample import choose_tokens

stats = pytest.importorskip("scipy.stats")


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def allowed_tokens(logits: np.ndarray, top_k: int, top_p: float, slack: float = 1e-4) -> set[int]:
    """Reference filter in numpy (temperature 1), generous by `slack` at the boundaries."""
    order = np.argsort(-logits, kind="stable")
    keep = order[: top_k or len(order)]
    probs = softmax(logits[keep])
    mass_before = np.cumsum(probs) - probs
    return {int(t) for t, m in zip(keep, mass_before, strict=True) if m < top_p + slack}


def chi_square_pvalue(counts: Counter, probs: np.ndarray) -> float:
    """Pearson chi-square of observed counts against `probs`; categories expected < 5 times pooled."""
    n = sum(counts.values())
    observed = np.array([counts.get(t, 0) for t in range(len(probs))], float)
    expected = probs * n
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    obs, exp = (obs, exp) if exp[-1] > 0 else (obs[:-1], exp[:-1])
    return float(stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


def test_filter_logits_matches_reference():
    logits = np.asarray(jax.random.normal(jax.random.key(0), (6, 50)) * 3)
    for top_k, top_p in [(5, 1.0), (0, 0.7), (10, 0.5), (0, 0.05), (50, 1.0)]:
        filtered = np.asarray(filter_logits(jnp.asarray(logits), SamplingSettings(1.0, top_k, top_p)))
        for row, frow in zip(logits, filtered, strict=True):
            assert {int(t) for t in np.flatnonzero(np.isfinite(frow))} == allowed_tokens(row, top_k, top_p, 0.0)
    scaled = np.asarray(filter_logits(jnp.asarray(logits), SamplingSettings(2.0, 0, 1.0)))
    np.testing.assert_allclose(scaled, logits / 2.0, rtol=1e-6)


def test_draws_follow_softmax_of_fixed_logits():
    logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    draws = jax.vmap(lambda k: choose_tokens(logits, k[None], 0, SamplingSettings(1.0))[0])(keys)
    p = chi_square_pvalue(Counter(np.asarray(draws).tolist()), softmax(np.asarray(logits[0])))
    assert p > 1e-4
    hot = jax.vmap(lambda k: choose_tokens(logits, k[None], 0, SamplingSettings(0.5))[0])(keys)
    assert chi_square_pvalue(Counter(np.asarray(hot).tolist()), softmax(np.asarray(logits[0]))) < 1e-6


@pytest.fixture(scope="module")
def peaked_model():
    """Tiny Llama whose lm_head is scaled up, so its next-token distribution is far from uniform."""
    model = tiny_model("llama", seed=3)
    model.lm_head[...] = model.lm_head[...] * 12.0
    return model


def test_temperature_one_matches_model_softmax(peaked_model, toy_tokenizer):
    prompt = "Tom has 5 apples and eats 2. How many are left?"
    n = 3000
    (samples,) = generate(peaked_model, toy_tokenizer, [prompt], max_new_tokens=2, temperature=1.0,
                          num_samples=n, batch_size=n, seed=11)
    ids = render_prompts(toy_tokenizer, [prompt])[0]
    probs = softmax(np.asarray(peaked_model(jnp.asarray([ids]))[0, -1]))
    assert probs.max() < 0.5 and chi_square_pvalue(Counter(range(len(probs))), probs) < 1e-6, "not near-uniform"
    first = Counter(s.token_ids[0] for s in samples)
    assert chi_square_pvalue(first, probs) > 1e-4
    # The second token, drawn in the decode loop from the KV cache, given the most common first token.
    t1, count = first.most_common(1)[0]
    assert count >= 200
    second = Counter(s.token_ids[1] for s in samples if s.token_ids[0] == t1 and len(s.token_ids) > 1)
    probs2 = softmax(np.asarray(peaked_model(jnp.asarray([ids + [t1]]))[0, -1]))
    assert chi_square_pvalue(second, probs2) > 1e-4


@pytest.mark.parametrize(("top_k", "top_p"), [(4, 1.0), (0, 0.6)])
def test_top_k_top_p_never_emit_excluded_tokens(peaked_model, toy_tokenizer, top_k, top_p):
    prompts = ["What is 9 times 7?", "Mike saves 15 dollars every week. How much has he saved after 8 weeks?"]
    out = generate(peaked_model, toy_tokenizer, prompts, max_new_tokens=6, temperature=1.0, top_k=top_k, top_p=top_p,
                   num_samples=48, seed=4)
    sequences = [ids + list(s.token_ids) for ids, samples in zip(render_prompts(toy_tokenizer, prompts), out,
                                                                 strict=True) for s in samples]
    width = 64  # one shape for every parametrization: the reference forward compiles once
    assert max(map(len, sequences)) <= width
    batch = np.zeros((len(sequences), width), np.int32)  # right padded: causal, earlier logits unaffected
    for i, seq in enumerate(sequences):
        batch[i, : len(seq)] = seq
    logits = np.asarray(peaked_model(jnp.asarray(batch)))
    checked, distinct = 0, set()
    for i, (ids, samples) in enumerate(zip(render_prompts(toy_tokenizer, prompts), out, strict=True)):
        for j, s in enumerate(samples):
            row = i * len(samples) + j
            for step, token in enumerate(s.token_ids):
                allowed = allowed_tokens(logits[row, len(ids) + step - 1], top_k, top_p)
                assert token in allowed, f"prompt {i} sample {j} step {step}: token {token} was excluded"
                checked += 1
                distinct.add((len(ids) + step, token))
    assert checked >= 500 and len(distinct) > 10

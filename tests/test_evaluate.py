"""`undo_jax.evaluate`: scores a student on a task split, agreeing with the sampler and the task's scorer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.undo.conftest import demo_rows, write_tiny_student
from undo_jax.config import eval_command
from undo_jax.undo.rundir import read_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    corpus = [f"{r['Body']} {r['Question']}" for r in demo_rows(420)] + ["The answer is 7."]
    return write_tiny_student(tmp_path_factory.mktemp("student") / "tiny", corpus, seed=3)


def scripted_student(out_dir: Path, answers: list[str]) -> Path:
    """A student whose completion is known: "The answer is A." for one of `answers`.

    Every layer's weights are zero, so the hidden state at a position is its own token's embedding; the chain
    tokens get orthogonal embeddings and the untied lm_head sends each to its successor (with equal logits to
    every successor where the chains branch), the last one to eos. Greedy decoding then writes the first
    chain whatever the question; sampling picks each branch with probability 1/len(answers)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from tests.sampling.conftest import make_tokenizer
    from undo_jax.models import CausalLM, ModelConfig, save_pretrained

    # The answer lines, frequent in the corpus, become few tokens, none repeated within a line.
    corpus = [f"{r['Body']} {r['Question']}" for r in demo_rows(200)] + [f"The answer is {a}." for a in answers] * 300
    tok = make_tokenizer(corpus)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    prompt = tok.apply_chat_template([{"role": "user", "content": "q"}], add_generation_prompt=True, tokenize=False)
    start = tok(prompt, add_special_tokens=False)["input_ids"][-1]  # the generation prompt's last token
    chains = [[start, *tok(f"The answer is {a}.", add_special_tokens=False)["input_ids"], eos] for a in answers]
    assert all(len(set(chain)) == len(chain) for chain in chains), [tok.convert_ids_to_tokens(c) for c in chains]
    successors: dict[int, set[int]] = {}
    for chain in chains:
        for a, b in zip(chain[:-1], chain[1:], strict=True):
            successors.setdefault(a, set()).add(b)
    basis = {t: i for i, t in enumerate(sorted(successors))}
    hidden = 32
    assert len(basis) <= hidden
    config = ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=hidden, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         tie_word_embeddings=False, max_position_embeddings=1024, eos_token_id=eos,
                         bos_token_id=None, pad_token_id=tok.pad_token_id)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0))))
    embed = np.zeros((len(tok), hidden), np.float32)
    head = np.zeros((hidden, len(tok)), np.float32)
    for t, i in basis.items():
        embed[t, i] = 1.0
        for nxt in successors[t]:
            head[i, nxt] = 4.0  # times sqrt(hidden) after the final RMSNorm: a margin of ~23 logits

    def fill(path, leaf):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if names[-2:] == ["weight", "value"]:  # RMSNorm scales
            return jnp.ones(leaf.shape, leaf.dtype)
        if names[0] == "embed_tokens":
            return jnp.asarray(embed)
        if names[0] == "lm_head":
            return jnp.asarray(head)
        return jnp.zeros(leaf.shape, leaf.dtype)

    model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))
    save_pretrained(model, out_dir, tokenizer=tok)
    return out_dir


# Hand-made test split (the presplit train/test layout): gold answers, and for each whether "7" is right.
GOLD = ["7", "12", "7", "3", "7.0", "70", "9", "7", "0.7", "9"]
TYPES = ["Addition", "Subtraction"] * 5


def write_split(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"ID": f"hand-{i}", "Body": f"Question number {i}.", "Question": "What is it?", "Equation": "( 1.0 )",
             "Answer": float(g), "Type": t} for i, (g, t) in enumerate(zip(GOLD, TYPES, strict=True))]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "train.jsonl").write_text("".join(json.dumps(dict(r, ID=f"tr-{r['ID']}")) + "\n" for r in rows))
    return folder


def test_evaluate_scores_known_completions(tmp_path):
    from undo_jax.evaluate import evaluate

    student = scripted_student(tmp_path / "student", ["7"])
    out = tmp_path / "eval" / "rows.jsonl"
    cfg = eval_command(student=str(student), task="svamp", split="test", eval_out=str(out),
                     data_source=str(write_split(tmp_path / "data")), max_new_tokens=12, eval_batch_size=8,
                     eval_chunk=4)
    summary = evaluate(cfg)
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [f"hand-{i}" for i in range(10)]
    assert [r["completion"] for r in rows] == ["The answer is 7."] * 10
    # Counted by hand from GOLD: "7" equals 7 and 7.0 (ids 0, 2, 4, 7), not 12, 3, 70, 9 or 0.7.
    right = [0, 2, 4, 7]
    assert [r["correct"] for r in rows] == [i in right for i in range(10)]
    assert (summary["correct"], summary["n"], summary["accuracy"]) == (4, 10, 0.4)
    # Breakdown by SVAMP Type: Addition holds the even ids (0, 2, 4 right of 5), Subtraction the odd (7 of 5).
    assert summary["breakdown"] == {"Addition": {"accuracy": 0.6, "correct": 3, "n": 5},
                                    "Subtraction": {"accuracy": 0.2, "correct": 1, "n": 5}}
    assert json.loads((tmp_path / "eval" / "rows.summary.json").read_text())["correct"] == 4


@pytest.mark.slow
def test_cli_scores_and_bad_student_is_one_line(student, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = tmp_path / "cli.jsonl"
    args = [sys.executable, "-m", "undo_jax.evaluate", "--task=svamp", "--split=validation", "--data_source=demo",
            "--val_size=6", "--max_new_tokens=6", f"--eval_out={out}"]
    ok = subprocess.run([*args, f"--student={student}"], cwd=REPO, env=env, text=True, capture_output=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    printed = json.loads(ok.stdout.strip().splitlines()[-1])
    assert printed["n"] == 6 and printed["split"] == "validation"
    assert len(read_jsonl(out)) == 6
    bad = subprocess.run([*args, f"--student={tmp_path / 'nothing'}"], cwd=REPO, env=env, text=True,
                         capture_output=True, timeout=300)
    assert bad.returncode == 1
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("undo_jax.evaluate: error:")]
    assert len(errors) == 1 and "nothing" in errors[0]


def test_maj_k_votes_over_samples(tmp_path):
    from undo_jax.evaluate import evaluate

    student = scripted_student(tmp_path / "student", ["7", "9"])  # each sample says 7 or 9, half and half
    out = tmp_path / "maj.jsonl"
    cfg = eval_command(student=str(student), task="svamp", split="test", eval_out=str(out),
                     data_source=str(write_split(tmp_path / "data")), max_new_tokens=12, maj_k=5,
                     eval_temperature=1.0, eval_chunk=4, eval_batch_size=20)
    summary = evaluate(cfg)
    rows = read_jsonl(out)
    said = [[s.removeprefix("The answer is ").removesuffix(".") for s in row["samples"]] for row in rows]
    assert all(len(s) == 5 and set(s) <= {"7", "9"} for s in said), said
    assert {"7", "9"} == {a for s in said for a in s}  # both answers were sampled
    # Count by hand: with 5 samples of two answers the majority is the one said 3 times or more.
    majority = ["7" if s.count("7") >= 3 else "9" for s in said]
    assert [r["prediction"] for r in rows] == majority
    for row, answer in zip(rows, majority, strict=True):
        assert row["completion"] == f"The answer is {answer}."  # a sample that carries the winning answer
    gold_is = {"7": {0, 2, 4, 7}, "9": {6, 9}}
    correct = [i in gold_is[answer] for i, answer in enumerate(majority)]
    assert [r["correct"] for r in rows] == correct and summary["correct"] == sum(correct)

"""The teacher-logit pass: equal to the teacher's own forward, computed once, resumable after kill -9, sharded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.train.helpers import tiny_model
from undo_jax.train.data import TokenizedExample
from undo_jax.train.distill_loss import sparse_top_k
from undo_jax.train.teacher_logits import (
    TeacherLogitsError,
    TeacherLogitStore,
    compute_teacher_logits,
    example_key,
)

REPO = Path(__file__).resolve().parents[2]
K = 6


def make_examples(n=11, seed=0) -> dict[str, TokenizedExample]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        length = int(rng.integers(6, 40))
        start = int(rng.integers(1, length - 1))
        out[f"ex{i}"] = TokenizedExample(rng.integers(0, 128, length).astype(np.int32), start)
    return out


@pytest.fixture(scope="module")
def teacher():
    return tiny_model(seed=3)


def _expected(teacher, ex: TokenizedExample, k=K):
    """The teacher's own unpadded forward over this example alone, at the completion's predicting positions."""
    logits = teacher(ex.ids[None], positions=np.arange(len(ex), dtype=np.int32)[None])[0]
    lp, ids, tail = (np.asarray(x) for x in sparse_top_k(logits, k))
    sl = slice(ex.completion_start - 1, len(ex) - 1)
    return lp[sl], ids[sl], tail[sl]


def test_stored_targets_equal_the_teachers_forward_and_are_never_recomputed(teacher, tmp_path):
    examples = make_examples()
    store = TeacherLogitStore(tmp_path, "tiny-teacher", K)
    counts = compute_teacher_logits(teacher, examples, store, batch_size=4)
    assert counts == {"computed": 11, "reused": 0}
    for eid, ex in examples.items():
        got = store.get(example_key("tiny-teacher", K, ex))
        lp, ids, tail = _expected(teacher, ex)
        assert len(got) == len(ex) - ex.completion_start
        np.testing.assert_array_equal(got.top_ids, ids, err_msg=eid)
        np.testing.assert_allclose(got.top_logp, lp, atol=2e-5, err_msg=eid)
        np.testing.assert_allclose(got.log_tail, tail, atol=2e-5, err_msg=eid)
    shards = sorted(store.folder.glob("shard-*.npz"))
    assert len(shards) == 3  # 11 examples in batches of 4
    # ≤ 0.5 KB per completion token at k = 32 (here k = 6: 8k + 4 bytes plus a small per-shard header).
    tokens = sum(len(ex) - ex.completion_start for ex in examples.values())
    assert sum(s.stat().st_size for s in shards) / tokens < 8 * K + 4 + 64

    # A re-run (fresh store object, as after a restart) computes nothing and writes nothing.
    again = TeacherLogitStore(tmp_path, "tiny-teacher", K)
    assert compute_teacher_logits(teacher, examples, again, batch_size=4) == {"computed": 0, "reused": 11}
    assert sorted(again.folder.glob("shard-*.npz")) == shards

    # An example whose tokens changed is recomputed, alone; another teacher id or k has its own folder.
    changed = dict(examples, ex3=TokenizedExample(examples["ex3"].ids[:-1], examples["ex3"].completion_start))
    assert compute_teacher_logits(teacher, changed, again, batch_size=4) == {"computed": 1, "reused": 10}
    other = TeacherLogitStore(tmp_path, "another-teacher", K)
    assert other.folder != again.folder and len(other) == 0


def test_bad_inputs_are_one_line_errors(teacher, tmp_path):
    store = TeacherLogitStore(tmp_path, "t", K)
    with pytest.raises(TeacherLogitsError, match="no prompt token"):
        compute_teacher_logits(teacher, {"a": TokenizedExample(np.arange(5, dtype=np.int32), 0)}, store)
    with pytest.raises(TeacherLogitsError, match="exceeds the teacher's vocabulary"):
        compute_teacher_logits(teacher, make_examples(2), TeacherLogitStore(tmp_path, "t", 500))
    (store.folder / "shard-000009-1.npz").write_bytes(b"not a zip")
    with pytest.raises(TeacherLogitsError, match="unreadable teacher-logit shard") as info:
        TeacherLogitStore(tmp_path, "t", K)
    assert "\n" not in str(info.value)


def test_sharded_pass_equals_one_device(teacher, tmp_path):
    from undo_jax.sharding import make_mesh, shard_model

    assert jax.device_count() == 8
    examples = make_examples(9, seed=1)
    one = TeacherLogitStore(tmp_path / "one", "t", K)
    compute_teacher_logits(teacher, examples, one, batch_size=8)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded_teacher = shard_model(tiny_model(seed=3), mesh)
    many = TeacherLogitStore(tmp_path / "many", "t", K)
    with jax.set_mesh(mesh):
        compute_teacher_logits(sharded_teacher, examples, many, batch_size=8, mesh=mesh)
    for ex in examples.values():
        a, b = one.get(example_key("t", K, ex)), many.get(example_key("t", K, ex))
        np.testing.assert_array_equal(a.top_ids, b.top_ids)
        np.testing.assert_allclose(a.top_logp, b.top_logp, atol=1e-5)
        np.testing.assert_allclose(a.log_tail, b.log_tail, atol=1e-5)


_WORKER = textwrap.dedent("""
    import os, sys, time
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, sys.argv[2])
    from tests.train.helpers import tiny_model
    from tests.train.test_teacher_logits import make_examples
    from undo_jax.train import teacher_logits as tl
    slow = os.environ.get("SLOW_SHARDS") == "1"
    write = tl.TeacherLogitStore.write
    def slow_write(self, items):  # leave time to be killed between shards
        out = write(self, items)
        if slow:
            time.sleep(0.5)
        return out
    tl.TeacherLogitStore.write = slow_write
    store = tl.TeacherLogitStore(sys.argv[1], "tiny-teacher", 6)
    print(tl.compute_teacher_logits(tiny_model(seed=3), make_examples(40, seed=2), store, batch_size=2), flush=True)
""")


@pytest.mark.slow  # three processes that each build the tiny model: ~40 s
def test_kill_during_the_pass_resumes_to_the_same_store(tmp_path):
    env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=str(REPO))
    clean = subprocess.run([sys.executable, "-c", _WORKER, str(tmp_path / "clean"), str(REPO)], env=env,
                           capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-2000:]

    killed_root = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(killed_root), str(REPO)],
                            env=dict(env, SLOW_SHARDS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(killed_root.glob("*/shard-*.npz"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(killed_root.glob("*/shard-*.npz")))
    assert 3 <= done_before < 20, done_before
    resumed = subprocess.run([sys.executable, "-c", _WORKER, str(killed_root), str(REPO)], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    computed = int(resumed.stdout.split("'computed': ")[1].split(",")[0])
    assert computed == 40 - 2 * done_before  # only what no shard held
    a = TeacherLogitStore(tmp_path / "clean", "tiny-teacher", 6)
    b = TeacherLogitStore(killed_root, "tiny-teacher", 6)
    assert not list(b.folder.glob(".tmp-*"))
    for ex in make_examples(40, seed=2).values():
        key = example_key("tiny-teacher", 6, ex)
        x, y = a.get(key), b.get(key)
        for name in ("top_logp", "top_ids", "log_tail"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name))


def test_vocabulary_check_names_both_models_and_the_first_difference():
    from tests.train.helpers import tiny_config, tiny_tokenizer
    from undo_jax.train.teacher_logits import check_same_vocabulary

    tok = tiny_tokenizer()
    cfg = tiny_config()
    check_same_vocabulary("T", cfg, tok, "S", cfg, tiny_tokenizer(), probe="abc 12")  # same: no error
    # Extra embedding rows past the tokenizer (alignment padding) do not count.
    check_same_vocabulary("T", tiny_config(vocab_size=160), tok, "S", cfg, tok, probe="abc")
    smaller = tiny_config(vocab_size=len(tok) - 1)
    with pytest.raises(TeacherLogitsError, match=r"teacher T has \d+ tokens, student S has \d+") as info:
        check_same_vocabulary("T", cfg, tok, "S", smaller, tok)
    assert "\n" not in str(info.value)

    with_ab, with_zz = tiny_tokenizer(), tiny_tokenizer()
    with_ab.add_tokens(["ab"])  # same size, but "ab" is one token for the teacher only
    with_zz.add_tokens(["zz"])
    with pytest.raises(TeacherLogitsError, match=r"tokenize the probe text differently from token 0"):
        check_same_vocabulary("T", cfg, with_ab, "S", cfg, with_zz, probe="abc")

"""The loop's refusals and less-travelled paths, through `run` (what `python -m undo_jax.main` calls): each
stops with one line naming what and where and leaves the run directory as it was, or does what its flag says.

Most tests copy the finished two-iteration run of the `undo_run` fixture and change one thing in it, so a
test costs one stage, not a run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.undo.conftest import number, tiny_config
from tests.undo.scripted_teacher import ScriptedTeacher
from undo_jax.teachers import SampleResult
from undo_jax.undo import RunDir, RunDirError, UndoError, run
from undo_jax.undo.rundir import atomic_write_jsonl, read_jsonl

OUTAGE = "HTTP 503: scripted outage"


class WrongTeacher(ScriptedTeacher):
    """Every first rationale ends with a wrong answer."""

    def _answer(self, request) -> str:
        text = super()._answer(request)
        if request.context["kind"] == "rationale":
            return text.rsplit("The answer is", 1)[0] + "The answer is -999."
        return text


class DownTeacher(ScriptedTeacher):
    """Every request of the given kinds fails (what a backend reports after its retries)."""

    def __init__(self, kinds=("rationale", "rewrite", "gaps"), empty: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.kinds, self.empty = kinds, empty

    def _dispatch(self, requests, keys, units, on_result, progress) -> None:
        for i, s in units:
            kind = requests[i].context["kind"]
            self.requests.append((kind, requests[i].messages[-1]["content"]))
            if kind not in self.kinds:
                on_result((i, s), SampleResult(self._answer(requests[i]), "stop", 10, 20))
            elif self.empty:
                on_result((i, s), SampleResult("  \n", "stop", 10, 0))
            else:
                on_result((i, s), OUTAGE)


def one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def copy_run(undo_run, tmp_path: Path) -> Path:
    src, _, _ = undo_run
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def snapshot(root: Path, pattern: str = "*") -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob(pattern)) if p.is_file()}


def stage_outputs(run_dir: Path) -> dict[str, bytes]:
    """Every file of every iteration (flags.txt and metrics.jsonl are rewritten by any re-run)."""
    return {k: v for k, v in snapshot(run_dir).items() if k.startswith("iter_")}


def unmark(run_dir: Path, k: int, *stages: str) -> None:
    for stage in stages:
        (run_dir / f"iter_{k}" / f"{stage}.DONE").unlink()


# ----- refusals before any model is loaded --------------------------------------------------------------------
@pytest.mark.parametrize("mesh, match", [
    (dict(mesh_data=8, batch_size=8, micro_batch=4),
     r"^--micro_batch=4 is not a multiple of the mesh's batch shards \(data x fsdp = 8\)$"),
    (dict(mesh_data=3), r"^--mesh_data=3 --mesh_fsdp=-1 --mesh_tensor=1: does not fit the 8 cpu device\(s\) jax sees "
                        r"\(8 devices do not divide by the fixed axes' product 3\)$"),
])
def test_mesh_that_does_not_fit_the_micro_batch_or_the_devices(tiny_student, tmp_path, mesh, match):
    teacher = ScriptedTeacher()
    with pytest.raises(UndoError, match=match) as e:
        run(tiny_config(tmp_path / "run", tiny_student, **mesh), teacher=teacher)
    one_line(e)
    assert teacher.requests == []
    assert not (tmp_path / "run").exists()  # checked before the run directory is written


def test_transfer_from_a_run_with_no_common_questions(tiny_student, tmp_path):
    other = tmp_path / "other_run" / "iter_2"
    atomic_write_jsonl(other / "data.jsonl", [{"id": f"gsm8k-{i}", "rationale": "x", "kept": True} for i in range(5)])
    teacher = ScriptedTeacher()
    cfg = tiny_config(tmp_path / "run", tiny_student, teacher_data_from=str(other), eval_base=False)
    with pytest.raises(UndoError, match=rf"^--teacher_data_from={other}: none of this run's training questions are "
                                        rf"in {other}/data.jsonl \(another task or split\?\)$") as e:
        run(cfg, teacher=teacher)
    one_line(e)
    assert teacher.requests == [] and not (tmp_path / "run" / "iter_1").exists()


NO_RATIONALE = "iteration 1: no usable rationale among 24 (all wrong or failed)"


@pytest.mark.parametrize("teacher_cls, overrides, message", [
    # every final answer wrong: all filtered out
    (WrongTeacher, {}, NO_RATIONALE),
    # every request failed: more than --max_teacher_failures (default 0), so the stage stops first
    (DownTeacher, {}, f"iteration 1: 32 of 32 teacher requests failed (more than --max_teacher_failures=0; first: "
                      f"{OUTAGE}); re-run to retry exactly those (the others are cached)"),
    # every request failed, all of them allowed to: nothing left to train on
    (DownTeacher, {"max_teacher_failures": 1.0}, f"{NO_RATIONALE}; first teacher error: {OUTAGE}"),
])
def test_no_usable_rationale(tiny_student, tmp_path, teacher_cls, overrides, message):
    teacher = teacher_cls()
    with pytest.raises(UndoError) as e:
        run(tiny_config(tmp_path / "run", tiny_student, eval_base=False, **overrides), teacher=teacher)
    assert one_line(e) == message
    assert [k for k, _ in teacher.requests] == ["rationale"] * (24 + 8)  # train, then the validation solutions
    assert not (tmp_path / "run" / "iter_1" / "data.jsonl").exists()
    assert not RunDir(tmp_path / "run").is_done(1, "data")


# ----- refusals in later stages (copies of the finished run) ------------------------------------------------
@pytest.mark.parametrize("empty, message, asked", [
    # a failed call is not retried here (the backend already retried it); the re-run asks again
    (False, f"iteration 2: the teacher's gap analysis failed ({OUTAGE}); re-run to retry", 1),
    # an empty report is unusable: asked once more, still empty, so the iteration stops
    (True, "iteration 2: empty gap report after one retry; re-run to ask again, or pass --allow_weak_gap_report "
           "to use it", 2),
])
def test_failed_gap_analysis(undo_run, tiny_student, tmp_path, empty, message, asked):
    run_dir = copy_run(undo_run, tmp_path)
    shutil.rmtree(run_dir / "iter_2")
    before = stage_outputs(run_dir)
    teacher = DownTeacher(kinds=("gaps",), empty=empty)
    with pytest.raises(UndoError) as e:
        run(tiny_config(run_dir, tiny_student), teacher=teacher)
    assert one_line(e) == message
    assert [k for k, _ in teacher.requests] == ["gaps"] * asked
    assert len({prompt for _, prompt in teacher.requests}) == 1  # the retry repeats the same request
    assert not (run_dir / "iter_2" / "gaps.md").exists() and not RunDir(run_dir).is_done(2, "gaps")
    assert stage_outputs(run_dir) == before


def test_no_training_examples(undo_run, tiny_student, tmp_path):
    run_dir = copy_run(undo_run, tmp_path)
    data = run_dir / "iter_2" / "data.jsonl"
    atomic_write_jsonl(data, [dict(r, kept=False, rationale=None) for r in read_jsonl(data)])
    unmark(run_dir, 2, "train", "eval_val", "eval_test")
    shutil.rmtree(run_dir / "iter_2" / "checkpoint")
    with pytest.raises(UndoError) as e:
        run(tiny_config(run_dir, tiny_student), teacher=ScriptedTeacher())
    assert one_line(e) == f"iteration 2: no training examples in {data}"
    assert not (run_dir / "iter_2" / "checkpoint").exists()


def test_corrupt_checkpoint_met_by_training(undo_run, tiny_student, tmp_path):
    # The trainer finds iteration 2's checkpoint (to resume from) damaged: one line, the files left as they are.
    run_dir = copy_run(undo_run, tmp_path)
    unmark(run_dir, 2, "train", "eval_val", "eval_test")
    ckpt = run_dir / "iter_2" / "checkpoint"
    for f in ckpt.rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0" * 7)
    before = snapshot(ckpt)
    with pytest.raises(UndoError, match=rf"^iteration 2: checkpoint {ckpt} is corrupt or unreadable \(\w+\); "
                                        r"move it away to retrain this iteration$") as e:
        run(tiny_config(run_dir, tiny_student), teacher=ScriptedTeacher())
    one_line(e)
    assert snapshot(ckpt) == before and not RunDir(run_dir).is_done(2, "train")


def test_corrupt_identity_json_is_refused_and_kept(undo_run, tiny_student, tmp_path):
    run_dir = copy_run(undo_run, tmp_path)
    (run_dir / "identity.json").write_text('{"student": "tr')
    before = snapshot(run_dir)
    with pytest.raises(RunDirError) as e:
        run(tiny_config(run_dir, tiny_student), teacher=ScriptedTeacher())
    assert one_line(e) == f"{run_dir / 'identity.json'}: corrupt (not JSON); cannot check the flags of this run"
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("stage", ["eval_val", "train", "data"])
def test_corrupt_done_marker_is_refused_and_kept(undo_run, tiny_student, tmp_path, stage):
    run_dir = copy_run(undo_run, tmp_path)
    marker = run_dir / "iter_1" / f"{stage}.DONE"
    marker.write_text('{"stage": "')
    before = stage_outputs(run_dir)
    teacher = ScriptedTeacher()
    with pytest.raises(RunDirError) as e:
        run(tiny_config(run_dir, tiny_student), teacher=teacher)
    assert one_line(e) == f"{marker}: corrupt stage marker (not JSON); delete it to redo that stage"
    assert teacher.requests == []
    assert stage_outputs(run_dir) == before


def test_an_old_final_export_is_moved_aside_not_deleted(undo_run, tiny_student, tmp_path):
    run_dir = copy_run(undo_run, tmp_path)
    _, _, state = undo_run
    best = state["best_iteration"]
    other = 3 - best  # the other iteration (1 or 2)
    final = run_dir / "final"
    (final / "undo_export.json").write_text(json.dumps({"iteration": other}))
    (final / "NOTE.txt").write_text("an earlier export")
    old = snapshot(final)
    assert run(tiny_config(run_dir, tiny_student), teacher=ScriptedTeacher()) == state
    (aside,) = run_dir.glob("final.replaced-*")
    assert snapshot(aside) == old  # kept whole, beside the new one
    assert json.loads((final / "undo_export.json").read_text())["iteration"] == best
    assert not (final / "NOTE.txt").exists() and (final / "config.json").is_file()
    run(tiny_config(run_dir, tiny_student), teacher=ScriptedTeacher())  # now current: nothing moves again
    assert len(list(run_dir.glob("final.replaced-*"))) == 1


def test_training_keeps_only_the_last_checkpoint(undo_run, tiny_student, tmp_path):
    # UNDO trains with keep=1: Orbax's max_to_keep prunes every earlier step. Iteration 2 is retrained with a
    # checkpoint every step (--save_every=1, so three saves); only the last step stays. Afterwards
    # --keep_train_state=last (the default) leaves iteration 1 params only.
    run_dir = copy_run(undo_run, tmp_path)
    unmark(run_dir, 2, "train", "prune_state", "eval_val", "eval_test")
    shutil.rmtree(run_dir / "iter_2" / "checkpoint")
    run(tiny_config(run_dir, tiny_student, save_every=1, allow_flag_change=True), teacher=ScriptedTeacher())
    log = read_jsonl(run_dir / "iter_2" / "train_log.jsonl")
    last = max(r["step"] for r in log if "loss" in r)
    assert last == 3  # so three step checkpoints were written
    steps = [p.name for p in (run_dir / "iter_2" / "checkpoint" / "state").iterdir() if p.name.isdigit()]
    assert steps == [str(last)]
    assert sorted(p.name for p in (run_dir / "iter_1" / "checkpoint").iterdir()) == ["model.json", "params"]


# ----- flags: --retrain=base, --filter_wrong=false, over the loopback OpenAI-protocol server ------------------
def wrong_every_fourth(task, record) -> str:
    from undo_jax.teachers.reference import reference_rationale

    text = reference_rationale(task, record)
    if number(record.id) % 4:
        return text
    return text.rsplit("The answer is", 1)[0] + f"The answer is {int(float(record.answer)) + 1}."


def test_http_teacher_run_with_retrain_base_and_unfiltered_rationales(tiny_student, tmp_path):
    """A whole fast run whose teacher is built from the flags and reached over HTTP (the loopback server with
    scripted replies): every request is answered once; --filter_wrong=false keeps the wrong rationales;
    --retrain=base trains iteration 2 from the base student for --epochs_first epochs."""
    from undo_jax.config import demo_data_path
    from undo_jax.models import load_pretrained, load_tokenizer
    from undo_jax.tasks import get_task
    from undo_jax.testing.servers import LoopbackServer
    from undo_jax.train import Example, TrainConfig, completion_loss
    from undo_jax.undo import prompts
    from undo_jax.undo.student import load_student

    task = get_task("svamp")
    settings = {"temperature": 0.0, "max_output_tokens": 256}
    records = {s: task.load(s, demo_data_path(), val_size=4) for s in ("train", "validation")}
    train = records["train"][:8]
    replies = {prompts.rationale_request(task, r, settings).messages[-1]["content"]: wrong_every_fourth(task, r)
               for r in train + records["validation"]}
    run_dir = tmp_path / "run"
    overrides = dict(teacher="openai", teacher_model="loopback", teacher_concurrency=4, retrain="base",
                     filter_wrong=False, eval_base=False, train_size=8, val_size=4, test_size=4, max_new_tokens=8,
                     eval_chunk=4, teacher_max_output_tokens=256)
    with LoopbackServer("openai", replies=replies) as server:
        state = run(tiny_config(run_dir, tiny_student, teacher_base_url=server.base_url, **overrides))
        stats = server.stats()
    assert state["iterations"] == 2
    # Every distinct request answered exactly once: 8 + 4 rationales, one gap report, 8 rewrites.
    assert stats["total"] == stats["total_completed"] == len(stats["completed"]) == 8 + 4 + 1 + 8
    assert all(n == 1 for n in stats["completed"].values())
    first = read_jsonl(run_dir / "iter_1" / "data.jsonl")
    assert [r["id"] for r in first] == [r.id for r in train]
    for row, record in zip(first, train, strict=True):
        assert row["teacher_text"] == wrong_every_fourth(task, record)
        assert row["teacher_correct"] == (number(record.id) % 4 != 0)
        assert row["kept"] and row["rationale"] == row["teacher_text"]  # kept, right or wrong
    assert any(not r["teacher_correct"] for r in first)
    rd = RunDir(run_dir)
    assert rd.marker_info(1, "train")["examples"] == 8
    assert [(rd.marker_info(k, "train")["from_iteration"], rd.marker_info(k, "train")["epochs"]) for k in (1, 2)] \
        == [(0, 2), (0, 2)]
    assert [m["epochs"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [2, 2]  # not 2, then 2 + 2
    # Iteration 2 started from the base student: its first step's loss (one step covers all 8 examples) is the
    # base student's loss on iteration 2's data, not iteration 1's student's.
    by_id = {r.id: r for r in train}
    examples = [Example(task.prompt_messages(by_id[r["id"]]), r["rationale"])
                for r in read_jsonl(run_dir / "iter_2" / "data.jsonl") if r["kept"]]
    config = TrainConfig(batch_size=8, micro_batch=8, max_length=256, progress=False)
    tok = load_tokenizer(str(tiny_student))
    base_loss = completion_loss(load_pretrained(str(tiny_student)), tok, examples, config)["loss"]
    iter1_loss = completion_loss(load_student(str(run_dir / "iter_1"))[0], tok, examples, config)["loss"]
    first_step = next(r["loss"] for r in read_jsonl(run_dir / "iter_2" / "train_log.jsonl") if r.get("step") == 1)
    assert first_step == pytest.approx(base_loss, rel=1e-4)
    assert abs(iter1_loss - base_loss) > 100 * 1e-4 * base_loss

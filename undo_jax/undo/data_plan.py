"""How iteration K's training data is made: one small strategy per way, chosen once from the config.

- `FirstRationales`: iteration 1 of a normal run: the teacher writes a rationale per training question
  (for UNDO also per validation question: the gap analysis shows the teacher its own solutions).
- `TransferRationales`: iteration 1 trains on another run's `iter_K/data.jsonl` (refined rationales).
- `CopyFirst`: standard distillation: every later iteration trains on iteration 1's data again.
- `Regenerate`: UNDO: a gap report on iteration K-1's validation failures, then the teacher rewrites the
  rationales of all training questions, or only of those the student got wrong (`wrong_only`).

A strategy returns the `Stage`s of its iteration; `UndoRun` runs them in order (each resumable).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from undo_jax.config import LoopConfig
from undo_jax.undo import prompts
from undo_jax.undo.prepare import UndoError
from undo_jax.undo.rundir import atomic_write_jsonl, atomic_write_text, read_jsonl

if TYPE_CHECKING:
    from undo_jax.undo.loop import UndoRun


@dataclasses.dataclass(frozen=True)
class Stage:
    """One resumable step: `fn` runs unless iter_<k>/<name>.DONE exists."""

    k: int
    name: str
    fn: Callable[[], dict[str, Any]]
    primary_only: bool = False  # only process 0 runs it (it talks to the teacher); the others wait


# ----- pure row builders (the data.jsonl records) -------------------------------------------------------------
def first_rationale_row(task, record, response, *, filter_wrong: bool) -> dict[str, Any]:
    text = response.texts[0] if response.texts else None
    prediction = task.extract_answer(text) if text else None
    correct = bool(text) and task.is_correct(prediction, record)
    kept = bool(text) and (correct or not filter_wrong)
    return {"id": record.id, "question": record.question, "answer": record.answer,
            "rationale": text if kept else None, "teacher_text": text, "teacher_prediction": prediction,
            "teacher_correct": correct, "kept": kept, "origin": "teacher", "error": response.error}


def rewrite_row(task, record, response, previous: dict[str, Any] | None) -> dict[str, Any]:
    """The rewrite if its final answer is right, else the previous rationale (or nothing)."""
    text = response.texts[0] if response.texts else None
    prediction = task.extract_answer(text) if text else None
    correct = bool(text) and task.is_correct(prediction, record)
    prev_rationale = (previous or {}).get("rationale")
    if correct:
        rationale, origin = text, "rewrite"
    else:
        rationale, origin = prev_rationale, "previous"
    return {"id": record.id, "question": record.question, "answer": record.answer, "rationale": rationale,
            "teacher_text": text, "teacher_prediction": prediction, "teacher_correct": correct,
            "kept": rationale is not None, "origin": origin, "error": response.error,
            "changed": rationale is not None and rationale != prev_rationale}


def carried_row(previous: dict[str, Any], origin: str) -> dict[str, Any]:
    return {**previous, "origin": origin, "changed": False}


# ----- is a teacher answer usable? ---------------------------------------------------------------------------
def rationale_problem(task, response) -> str | None:
    """Why a rationale answer is unusable (None: usable). Failed calls are counted apart, not here."""
    text = response.texts[0] if response.texts else ""
    if not text.strip():
        return "empty answer"
    if task.extract_answer(text) is None:
        return "no final-answer line"
    return None


def gap_report_problem(response) -> str | None:
    """Why a gap report is unusable: empty, or degenerate (one line repeated, e.g. "The answer is 154" x10)."""
    text = response.texts[0] if response.texts else ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return "empty gap report"
    distinct = len(set(lines))
    if len(lines) >= 3 and distinct <= len(lines) // 2:
        return f"degenerate gap report ({len(lines)} lines, {distinct} distinct)"
    if len(" ".join(lines).split()) < 5:
        return "gap report shorter than 5 words"
    return None


# ----- strategies ----------------------------------------------------------------------------------------------
class DataStrategy:
    """Makes the training data of one iteration (`data.jsonl`), with whatever stages that needs first."""

    def stages(self, run: UndoRun, k: int) -> list[Stage]:
        raise NotImplementedError


class FirstRationales(DataStrategy):
    def __init__(self, *, with_validation: bool):
        self.with_validation = with_validation

    def stages(self, run: UndoRun, k: int) -> list[Stage]:
        return [Stage(k, "data", lambda: self.make(run, k), primary_only=True)]

    def train_rows(self, run: UndoRun) -> tuple[list[dict[str, Any]], dict[str, dict]]:
        task, train = run.task, run.splits["train"]
        responses, usage = run.ask_teacher([prompts.rationale_request(task, r, run.teacher_settings) for r in train],
                                           problem=lambda resp: rationale_problem(task, resp))
        return [first_rationale_row(task, r, resp, filter_wrong=run.cfg.loop.filter_wrong)
                for r, resp in zip(train, responses, strict=True)], usage

    def make(self, run: UndoRun, k: int) -> dict[str, Any]:
        rows, usage = self.train_rows(run)
        info: dict[str, Any] = {"teacher": usage}
        if self.with_validation:
            val = run.splits["validation"]
            requests = [prompts.rationale_request(run.task, r, run.teacher_settings) for r in val]
            responses, val_usage = run.ask_teacher(requests, problem=lambda resp: rationale_problem(run.task, resp))
            val_rows = [first_rationale_row(run.task, r, resp, filter_wrong=False)
                        for r, resp in zip(val, responses, strict=True)]
            atomic_write_jsonl(run.rd.iter_dir(k) / "val_rationales.jsonl", val_rows)
            info["teacher"] = merge_usage(usage, val_usage)
        return run.finish_data(k, rows, info)


class TransferRationales(FirstRationales):
    def __init__(self, source: str, *, with_validation: bool):
        super().__init__(with_validation=with_validation)
        self.source = source

    def train_rows(self, run: UndoRun) -> tuple[list[dict[str, Any]], dict[str, dict]]:
        train = run.splits["train"]
        path = Path(self.source) / "data.jsonl"
        by_id = {r["id"]: r for r in read_jsonl(path)}
        if not any(r.id in by_id for r in train):
            raise UndoError(f"--teacher_data_from={self.source}: none of this run's training questions are in {path} "
                            f"(another task or split?)")
        return [carried_row(by_id[r.id], f"transfer:{self.source}") for r in train if r.id in by_id], {}


class CopyFirst(DataStrategy):
    def stages(self, run: UndoRun, k: int) -> list[Stage]:
        def make() -> dict[str, Any]:
            return run.finish_data(k, [carried_row(r, "iteration_1") for r in run.data_rows(1)], {"teacher": {}})

        return [Stage(k, "data", make, primary_only=True)]


class Regenerate(DataStrategy):
    def __init__(self, *, wrong_only: bool):
        self.wrong_only = wrong_only

    def stages(self, run: UndoRun, k: int) -> list[Stage]:
        before = [Stage(k - 1, "eval_train", lambda: run.stage_eval(k - 1, "train"))] if self.wrong_only else []
        return [*before, Stage(k, "gaps", lambda: self.gaps(run, k), primary_only=True),
                Stage(k, "data", lambda: self.make(run, k), primary_only=True)]

    def gaps(self, run: UndoRun, k: int) -> dict[str, Any]:
        failures = run.failures(k - 1)[: run.cfg.loop.diagnosis_examples]
        request = prompts.gaps_request(run.task, failures, run.history(k - 1), run.teacher_settings)
        (response,), usage = run.ask_teacher([request], problem=gap_report_problem)
        if response.error:
            raise UndoError(f"iteration {k}: the teacher's gap analysis failed ({response.error}); re-run to retry")
        problem = gap_report_problem(response)
        if problem and not run.cfg.loop.allow_weak_gap_report:
            raise UndoError(f"iteration {k}: {problem} after one retry; re-run to ask again, or pass "
                            f"--allow_weak_gap_report to use it")
        atomic_write_text(run.rd.iter_dir(k) / "gaps.md", (response.texts[0] if response.texts else "").strip() + "\n")
        return {"teacher": usage, "failures_shown": len(failures), "weak_gap_report": problem}

    def chosen(self, run: UndoRun, k: int) -> list:
        train = run.splits["train"]
        if not self.wrong_only:
            return list(train)
        wrong = {r["id"] for r in read_jsonl(run.rd.iter_dir(k - 1) / "eval_train.jsonl") if not r["correct"]}
        return [r for r in train if r.id in wrong]

    def make(self, run: UndoRun, k: int) -> dict[str, Any]:
        task = run.task
        previous = {r["id"]: r for r in run.data_rows(k - 1)}
        gaps = (run.rd.iter_dir(k) / "gaps.md").read_text(encoding="utf-8")
        examples = run.failures(k - 1)[: run.cfg.loop.rewrite_examples]
        chosen = self.chosen(run, k)
        requests = [prompts.rewrite_request(task, r, (previous.get(r.id) or {}).get("rationale"), gaps, examples,
                                            run.teacher_settings) for r in chosen]
        responses, usage = run.ask_teacher(requests, problem=lambda resp: rationale_problem(task, resp))
        rewritten = {r.id: rewrite_row(task, r, resp, previous.get(r.id))
                     for r, resp in zip(chosen, responses, strict=True)}
        rows = []
        for r in run.splits["train"]:
            if r.id in rewritten:
                rows.append(rewritten[r.id])
            elif r.id in previous:
                rows.append(carried_row(previous[r.id], "previous"))
        return run.finish_data(k, rows, {"teacher": usage, "rewritten": len(chosen),
                                         "rewrite_wrong": sum(not v["teacher_correct"] for v in rewritten.values())})


@dataclasses.dataclass(frozen=True)
class DataPlan:
    """The strategy of iteration 1, that of every later one, and whether flat validation stops the loop early."""

    first: DataStrategy
    later: DataStrategy
    early_stop: bool

    def for_iteration(self, k: int) -> DataStrategy:
        return self.first if k == 1 else self.later


def choose_data_plan(loop: LoopConfig) -> DataPlan:
    undo = loop.mode == "undo"
    if loop.teacher_data_from:
        first: DataStrategy = TransferRationales(loop.teacher_data_from, with_validation=undo)
    else:
        first = FirstRationales(with_validation=undo)
    later = Regenerate(wrong_only=loop.regenerate == "wrong") if undo else CopyFirst()
    return DataPlan(first=first, later=later, early_stop=undo)


def student_stage_names(loop: LoopConfig, k: int) -> list[str]:
    """The student's stages of iteration k (0: the base student, evaluated only)."""
    train = ["train", "prune_state"] if k > 0 else []
    if k > 0 and loop.distill in ("logits", "on_policy"):
        train.insert(0, "teacher_logits")
    return [*train, "eval_val", "eval_test"]


def stage_names(loop: LoopConfig, k: int) -> list[tuple[int, str]]:
    """(iteration, stage) pairs the loop runs for iteration k, in order (a strategy may add a stage to k-1)."""
    if k == 0:
        return [(0, name) for name in student_stage_names(loop, 0)] if loop.eval_base else []
    data = [(s.k, s.name) for s in choose_data_plan(loop).for_iteration(k).stages(None, k)]
    return [*data, *((k, name) for name in student_stage_names(loop, k))]


LEDGER_FIELDS = ("calls", "cache_hits", "errors", "retries", "input_tokens", "output_tokens", "cost_usd")


def ledger_delta(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """Per backend/model: what a stage added to the teacher's cost ledger."""
    out = {}
    for name, entry in after.items():
        old = before.get(name, {})
        delta = {f: entry.get(f, 0) - old.get(f, 0) for f in LEDGER_FIELDS}
        if any(delta.values()):
            out[name] = delta
    return out


def merge_usage(a: dict[str, dict], b: dict[str, dict]) -> dict[str, dict]:
    out = {k: dict(v) for k, v in a.items()}
    for name, entry in b.items():
        tgt = out.setdefault(name, dict.fromkeys(LEDGER_FIELDS, 0))
        for f in LEDGER_FIELDS:
            tgt[f] = tgt.get(f, 0) + entry.get(f, 0)
    return out

"""The UNDO loop (DESIGN.md): teacher rationales -> fine-tune -> evaluate -> gap analysis -> regenerate -> ...

Every stage of every iteration is persisted with a `<stage>.DONE` marker written after its outputs are
in place; a re-run of the same command skips finished stages and resumes the unfinished one (the teacher
cache makes its finished calls free, the trainer resumes from its Orbax checkpoint, evaluation from its
finished chunks). Process 0 alone talks to the teacher and writes shared files; every process loads,
trains, samples and checkpoints, and teacher data reaches the others through the run directory
(write, then barrier).
"""

from __future__ import annotations

import json
import logging
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any

from undo_jax import distributed
from undo_jax.flags import DEMO_DATA, RunConfig
from undo_jax.undo import prompts
from undo_jax.undo.convergence import best_iteration, stop_reason
from undo_jax.undo.rundir import RunDir, atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl
from undo_jax.undo.student import (
    EvalSettings,
    StudentError,
    evaluate_records,
    load_model,
    load_tokenizer,
    restore_into,
)

log = logging.getLogger("undo_jax.undo")

LEDGER_FIELDS = ("calls", "cache_hits", "errors", "retries", "input_tokens", "output_tokens", "cost_usd")


class UndoError(RuntimeError):
    """The run cannot go on (message: one line naming what and where)."""


def demo_data_path() -> str:
    return str(resources.files("undo_jax").joinpath("data", "demo_arith.jsonl"))


def resolve_data_source(source: str | None) -> str | None:
    if source == DEMO_DATA:
        return demo_data_path()
    if source is not None and not os.path.exists(source):
        raise UndoError(f"--data_source={source}: no such file or directory")
    return source


def ledger_delta(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """Per backend/model: what a stage added to the teacher's cost ledger."""
    out = {}
    for name, entry in after.items():
        old = before.get(name, {})
        delta = {f: entry.get(f, 0) - old.get(f, 0) for f in LEDGER_FIELDS}
        if any(delta.values()):
            out[name] = delta
    return out


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


class UndoRun:
    """One run of the loop over a run directory. `teacher` overrides the flag-built teacher (tests)."""

    def __init__(self, cfg: RunConfig, *, teacher=None, progress: bool = False):
        self.cfg = cfg
        self.rd = RunDir(cfg.run_dir)
        self.primary = distributed.is_primary()
        self.progress = progress
        self._teacher = teacher
        self._owns_teacher = teacher is None
        self._model = None
        self._model_iter: int | None = None  # which iteration's parameters self._model holds (0 = base)
        self.mesh = None
        self.task = None
        self.splits: dict[str, list] = {}

    # ----- setup -------------------------------------------------------------------------------------------
    def preflight(self) -> None:
        """Everything that can fail cheaply fails here, before any model is loaded or teacher called."""
        cfg = self.cfg
        if self.primary:
            self.rd.prepare(cfg.to_flag_lines(), cfg.identity(), allow_change=cfg.allow_flag_change)
        distributed.sync("undo-prepare")
        from undo_jax.tasks import TaskDataError, get_task

        self.task = get_task(cfg.task)
        source = resolve_data_source(cfg.data_source)
        try:
            train = self.task.load("train", source, val_size=cfg.val_size, seed=cfg.data_seed)
            val = self.task.load("validation", source, val_size=cfg.val_size, seed=cfg.data_seed)
            test = self.task.load("test", source, val_size=cfg.val_size, seed=cfg.data_seed)
        except (TaskDataError, FileNotFoundError, ValueError) as e:
            raise UndoError(f"task {cfg.task} data ({source or 'hub'}): {e}") from None
        if cfg.train_size:
            train = train[: cfg.train_size]
        if cfg.test_size:
            test = test[: cfg.test_size]
        self.splits = {"train": train, "validation": val, "test": test}
        log.info("data: %d train, %d validation, %d test", len(train), len(val), len(test))
        if self.primary and self._teacher is None:
            self._teacher = self._make_teacher()
        self.tokenizer = load_tokenizer(cfg.student)
        from undo_jax.sharding import make_mesh

        try:
            self.mesh = make_mesh(cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tensor)
        except ValueError as e:
            raise UndoError(f"--mesh_*: {e}") from None
        row_multiple = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if cfg.micro_batch % row_multiple:
            raise UndoError(f"--micro_batch={cfg.micro_batch} is not a multiple of the mesh's batch shards "
                            f"(data x fsdp = {row_multiple})")

    def _make_teacher(self):
        from undo_jax.teachers import make_teacher

        cfg = self.cfg
        prices = {"price_input_per_mtok": cfg.teacher_price_input, "price_output_per_mtok": cfg.teacher_price_output}
        api = {"concurrency": cfg.teacher_concurrency, "rpm": cfg.teacher_rpm, "tpm": cfg.teacher_tpm, **prices}
        options: dict[str, Any]
        if cfg.teacher == "reference":
            options = {}
        elif cfg.teacher == "gemini":
            options = {**api, "thinking_budget": cfg.teacher_thinking_budget, "base_url": cfg.teacher_base_url}
            if cfg.teacher_model:
                options["model"] = cfg.teacher_model
        elif cfg.teacher == "openai":
            options = {**api, "model": cfg.teacher_model}
            if cfg.teacher_base_url:
                options["base_url"] = cfg.teacher_base_url
            if cfg.teacher_api_key_env:
                options["api_key_env"] = cfg.teacher_api_key_env
        else:
            options = {"model_path": cfg.teacher_model, **prices}
        try:
            return make_teacher(cfg.teacher, cache_path=str(self.rd.cache_path), **options)
        except (ValueError, ImportError, OSError) as e:
            raise UndoError(f"--teacher={cfg.teacher}: {e}") from None

    @property
    def teacher(self):
        if self._teacher is None:
            raise UndoError("internal: the teacher is used on process 0 only")
        return self._teacher

    @property
    def teacher_settings(self) -> dict[str, Any]:
        return {"temperature": self.cfg.teacher_temperature, "max_output_tokens": self.cfg.teacher_max_output_tokens}

    def close(self) -> None:
        if self._owns_teacher and self._teacher is not None:
            self._teacher.close()
            self._teacher = None

    # ----- stage machinery ---------------------------------------------------------------------------------
    def stage(self, k: int, name: str, fn, *, primary_only: bool = False) -> dict[str, Any]:
        """Run `fn` unless iter_k/<name>.DONE exists; record its wall time (and what it returns) in the marker."""
        # One decision for all processes: one could read the marker before process 0 writes it, another after.
        if distributed.primary_decides(self.rd.is_done(k, name)):
            return self.rd.marker_info(k, name) or {}
        log.info("iteration %d: %s", k, name)
        start = time.time()
        info: dict[str, Any] = {}
        if self.primary or not primary_only:
            info = fn() or {}
        info["seconds"] = round(time.time() - start, 3)
        if self.primary:
            self.rd.mark_done(k, name, info)
        distributed.sync(f"undo-{name}-{k}")
        return info

    def ask_teacher(self, requests) -> tuple[list, dict[str, dict]]:
        before = self.teacher.ledger.to_dict()
        responses = self.teacher.generate(requests, progress=self.progress)
        return responses, ledger_delta(before, self.teacher.ledger.to_dict())

    # ----- data stages -------------------------------------------------------------------------------------
    def data_rows(self, k: int) -> list[dict[str, Any]]:
        return read_jsonl(self.rd.iter_dir(k) / "data.jsonl")

    def stage_first_data(self) -> dict[str, Any]:
        cfg, task = self.cfg, self.task
        train = self.splits["train"]
        usage: dict[str, dict] = {}
        if cfg.teacher_data_from:
            rows = self._transfer_rows(train)
        else:
            responses, usage = self.ask_teacher([prompts.rationale_request(task, r, self.teacher_settings)
                                                 for r in train])
            rows = [first_rationale_row(task, r, resp, filter_wrong=cfg.filter_wrong)
                    for r, resp in zip(train, responses, strict=True)]
        info: dict[str, Any] = {"teacher": usage}
        if cfg.mode == "undo":
            # The gap analysis shows the teacher its own solution of each failed validation question.
            val = self.splits["validation"]
            responses, val_usage = self.ask_teacher([prompts.rationale_request(task, r, self.teacher_settings)
                                                     for r in val])
            val_rows = [first_rationale_row(task, r, resp, filter_wrong=False)
                        for r, resp in zip(val, responses, strict=True)]
            atomic_write_jsonl(self.rd.iter_dir(1) / "val_rationales.jsonl", val_rows)
            info["teacher"] = _merge_usage(usage, val_usage)
        return self._finish_data(1, rows, info)

    def _transfer_rows(self, train) -> list[dict[str, Any]]:
        source = Path(self.cfg.teacher_data_from) / "data.jsonl"
        by_id = {r["id"]: r for r in read_jsonl(source)}
        missing = [r.id for r in train if r.id not in by_id]
        if len(missing) == len(train):
            raise UndoError(f"--teacher_data_from={self.cfg.teacher_data_from}: none of this run's training questions "
                            f"are in {source} (another task or split?)")
        rows = []
        for r in train:
            if r.id in by_id:
                rows.append(carried_row(by_id[r.id], f"transfer:{self.cfg.teacher_data_from}"))
        return rows

    def _finish_data(self, k: int, rows: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
        kept = sum(bool(r["kept"]) for r in rows)
        if kept == 0:
            errors = [r["error"] for r in rows if r.get("error")]
            hint = f"; first teacher error: {errors[0]}" if errors else ""
            raise UndoError(f"iteration {k}: no usable rationale among {len(rows)} (all wrong or failed){hint}")
        atomic_write_jsonl(self.rd.iter_dir(k) / "data.jsonl", rows)
        return {**info, "rows": len(rows), "kept": kept, "changed": sum(bool(r.get("changed")) for r in rows),
                "teacher_errors": sum(bool(r.get("error")) for r in rows)}

    def failures(self, k: int) -> list[dict[str, Any]]:
        """Validation failures of iteration k's student, with the teacher's own solution of each."""
        rows = read_jsonl(self.rd.iter_dir(k) / "eval_val.jsonl")
        teacher_path = self.rd.iter_dir(1) / "val_rationales.jsonl"
        own = {r["id"]: r.get("teacher_text") for r in read_jsonl(teacher_path)} if teacher_path.is_file() else {}
        return [{**r, "teacher_rationale": own.get(r["id"])} for r in rows if not r["correct"]]

    def history(self, upto: int) -> list[dict[str, Any]]:
        out = []
        for m in self.metrics():
            if 1 <= m["iteration"] <= upto:
                entry = {"iteration": m["iteration"], "val_accuracy": m["val_accuracy"],
                         "train_examples": m.get("train_examples")}
                gaps = self.rd.iter_dir(m["iteration"]) / "gaps.md"
                if gaps.is_file():
                    first = next((ln.strip("-* ").strip() for ln in gaps.read_text().splitlines() if ln.strip()), "")
                    entry["gaps_summary"] = first[:200]
                out.append(entry)
        return out

    def stage_gaps(self, k: int) -> dict[str, Any]:
        failures = self.failures(k - 1)[: self.cfg.diagnosis_examples]
        request = prompts.gaps_request(self.task, failures, self.history(k - 1), self.teacher_settings)
        (response,), usage = self.ask_teacher([request])
        if response.error or not response.texts or not response.texts[0].strip():
            raise UndoError(f"iteration {k}: the teacher's gap analysis failed ({response.error or 'empty answer'})")
        atomic_write_text(self.rd.iter_dir(k) / "gaps.md", response.texts[0].strip() + "\n")
        return {"teacher": usage, "failures_shown": len(failures)}

    def stage_regenerate(self, k: int) -> dict[str, Any]:
        cfg, task = self.cfg, self.task
        previous = {r["id"]: r for r in self.data_rows(k - 1)}
        gaps = (self.rd.iter_dir(k) / "gaps.md").read_text(encoding="utf-8")
        examples = self.failures(k - 1)[: cfg.rewrite_examples]
        train = self.splits["train"]
        if cfg.regenerate == "wrong":
            wrong = {r["id"] for r in read_jsonl(self.rd.iter_dir(k - 1) / "eval_train.jsonl") if not r["correct"]}
            chosen = [r for r in train if r.id in wrong]
        else:
            chosen = list(train)
        requests = [prompts.rewrite_request(task, r, (previous.get(r.id) or {}).get("rationale"), gaps, examples,
                                            self.teacher_settings) for r in chosen]
        responses, usage = self.ask_teacher(requests) if requests else ([], {})
        rewritten = {r.id: rewrite_row(task, r, resp, previous.get(r.id))
                     for r, resp in zip(chosen, responses, strict=True)}
        rows = []
        for r in train:
            if r.id in rewritten:
                rows.append(rewritten[r.id])
            elif r.id in previous:
                rows.append(carried_row(previous[r.id], "previous"))
        return self._finish_data(k, rows, {"teacher": usage, "rewritten": len(chosen),
                                           "rewrite_wrong": sum(not v["teacher_correct"] for v in rewritten.values())})

    def stage_copy_first(self, k: int) -> dict[str, Any]:
        rows = [carried_row(r, "iteration_1") for r in self.data_rows(1)]
        return self._finish_data(k, rows, {"teacher": {}})

    # ----- student stages ----------------------------------------------------------------------------------
    def base_model(self):
        return load_model(self.cfg.student, param_dtype=self.cfg.param_dtype, mesh=self.mesh)

    def model_of(self, k: int):
        """The student after iteration k (0 = base), reusing the one in memory when it matches."""
        if self._model is not None and self._model_iter == k:
            return self._model
        model = self.base_model()
        if k > 0:
            try:
                restore_into(model, self.rd.iter_dir(k) / "checkpoint")
            except StudentError as e:
                raise StudentError(f"{e}; to retrain iteration {k}, move iter_{k}/checkpoint and iter_{k}/train.DONE "
                                   f"away and re-run") from None
        self._model, self._model_iter = model, k
        return model

    def epochs_of(self, k: int) -> int:
        if k == 1 or self.cfg.retrain == "base":
            return self.cfg.epochs_first
        return self.cfg.epochs_later

    def stage_train(self, k: int) -> dict[str, Any]:
        from undo_jax.train import Example, TrainConfig, train

        cfg, task = self.cfg, self.task
        by_id = {r.id: r for r in self.splits["train"]}
        rows = [r for r in self.data_rows(k) if r["kept"]]
        examples = [Example(prompt=task.prompt_messages(by_id[r["id"]]), completion=r["rationale"])
                    for r in rows if r["id"] in by_id]
        if not examples:
            raise UndoError(f"iteration {k}: no training examples in {self.rd.iter_dir(k) / 'data.jsonl'}")
        start_from = 0 if (k == 1 or cfg.retrain == "base") else k - 1
        model = self.model_of(start_from)
        self._model, self._model_iter = None, None  # trained in place: no longer iteration start_from's student
        config = TrainConfig(lr=cfg.lr, epochs=self.epochs_of(k), batch_size=cfg.batch_size,
                             micro_batch=cfg.micro_batch, max_length=cfg.max_length, warmup_ratio=cfg.warmup_ratio,
                             seed=cfg.seed, compute_dtype=cfg.compute_dtype, save_every=cfg.save_every, keep=1,
                             progress=self.progress)
        ckpt = self.rd.iter_dir(k) / "checkpoint"
        try:
            model = train(model, self.tokenizer, examples, config, mesh=self.mesh, checkpoint_dir=ckpt,
                          log_path=self.rd.iter_dir(k) / "train_log.jsonl")
        except Exception as e:  # noqa: BLE001 - a damaged Orbax checkpoint surfaces as many types
            # Its meta file unreadable (JSONDecodeError, a ValueError), or Orbax failing on the arrays.
            damaged = isinstance(e, json.JSONDecodeError) or (
                not isinstance(e, ValueError) and "checkpoint" in f"{type(e).__name__} {e}".lower())
            if ckpt.exists() and damaged:
                raise UndoError(f"iteration {k}: checkpoint {ckpt} is corrupt or unreadable "
                                f"({type(e).__name__}); move it away to retrain this iteration") from None
            if isinstance(e, ValueError):  # a checkpoint of other data/settings, or nothing trainable
                raise UndoError(f"iteration {k} training: {e}") from None
            raise
        self._model, self._model_iter = model, k
        return {"examples": len(examples), "epochs": config.epochs, "from_iteration": start_from}

    def eval_settings(self) -> EvalSettings:
        cfg = self.cfg
        return EvalSettings(max_new_tokens=cfg.max_new_tokens, maj_k=cfg.maj_k, temperature=cfg.eval_temperature,
                            batch_size=cfg.eval_batch_size, chunk=cfg.eval_chunk, seed=cfg.seed)

    def stage_eval(self, k: int, split: str) -> dict[str, Any]:
        name = {"validation": "eval_val", "test": "eval_test", "train": "eval_train"}[split]
        model = self.model_of(k)
        summary = evaluate_records(model, self.tokenizer, self.task, self.splits[split], self.eval_settings(),
                                   self.rd.iter_dir(k) / f"{name}.jsonl", mesh=self.mesh, progress=self.progress,
                                   write=self.primary)
        log.info("iteration %d: %s accuracy %.1f%% (%d/%d)", k, split, 100 * summary["accuracy"],
                 summary["correct"], summary["n"])
        return {"summary": summary}

    # ----- metrics, export, report -------------------------------------------------------------------------
    def metrics(self) -> list[dict[str, Any]]:
        """One row per iteration whose validation and test evaluations are done (iteration 0 = base)."""
        out, epochs = [], 0
        for k in self.rd.iterations():
            val, test = self.rd.marker_info(k, "eval_val"), self.rd.marker_info(k, "eval_test")
            if val is None or test is None:
                continue
            train = self.rd.marker_info(k, "train") or {}
            if k > 0:
                epochs = train.get("epochs", 0) + (epochs if train.get("from_iteration", 0) else 0)
            out.append({"iteration": k, "mode": self.cfg.mode, "epochs": epochs,
                        "train_examples": train.get("examples"),
                        "val_accuracy": val["summary"]["accuracy"], "test_accuracy": test["summary"]["accuracy"],
                        "val_n": val["summary"]["n"], "test_n": test["summary"]["n"]})
        return out

    def write_metrics(self) -> list[dict[str, Any]]:
        rows = self.metrics()
        if self.primary:
            atomic_write_jsonl(self.rd.metrics_path, rows)
        return rows

    def export_final(self, best: int) -> None:
        import json

        from undo_jax.models import save_pretrained

        final = self.rd.final_dir
        info_path = final / "undo_export.json"
        if distributed.primary_decides(info_path.is_file()
                                       and json.loads(info_path.read_text()).get("iteration") == best):
            return
        # Every process takes part in gathering parameters held by other processes; only process 0 writes.
        model = distributed.host_copy(self.model_of(best))
        if self.primary:
            if final.exists():  # an export of another iteration (or one cut short): keep it aside, never delete
                os.replace(final, final.with_name(f"final.replaced-{time.strftime('%Y%m%d-%H%M%S')}"))
            save_pretrained(model, final, tokenizer=self.tokenizer)
            atomic_write_json(info_path, {"iteration": best, "student": self.cfg.student, "mode": self.cfg.mode})
        distributed.sync("undo-export")

    # ----- the loop ----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        try:
            self.preflight()
            if cfg.eval_base:
                self.stage(0, "eval_val", lambda: self.stage_eval(0, "validation"))
                self.stage(0, "eval_test", lambda: self.stage_eval(0, "test"))
            reason = None
            k = 0
            while reason is None:
                k += 1
                if k == 1:
                    self.stage(1, "data", self.stage_first_data, primary_only=True)
                elif cfg.mode == "undo":
                    if cfg.regenerate == "wrong":
                        self.stage(k - 1, "eval_train", lambda j=k - 1: self.stage_eval(j, "train"))
                    self.stage(k, "gaps", lambda j=k: self.stage_gaps(j), primary_only=True)
                    self.stage(k, "data", lambda j=k: self.stage_regenerate(j), primary_only=True)
                else:
                    self.stage(k, "data", lambda j=k: self.stage_copy_first(j), primary_only=True)
                self.stage(k, "train", lambda j=k: self.stage_train(j))
                self.stage(k, "eval_val", lambda j=k: self.stage_eval(j, "validation"))
                self.stage(k, "eval_test", lambda j=k: self.stage_eval(j, "test"))
                metrics = [m for m in self.write_metrics() if 1 <= m["iteration"] <= k]
                reason = stop_reason([m["val_accuracy"] for m in metrics], epsilon_points=cfg.epsilon,
                                     patience=cfg.patience, max_iterations=cfg.max_iterations,
                                     early_stop=cfg.mode == "undo")
            metrics = [m for m in self.write_metrics() if 1 <= m["iteration"] <= k]
            best = best_iteration([m["val_accuracy"] for m in metrics])
            self.export_final(best)
            state = {"iterations": k, "stop_reason": reason, "best_iteration": best,
                     "best_val_accuracy": metrics[best - 1]["val_accuracy"],
                     "best_test_accuracy": metrics[best - 1]["test_accuracy"]}
            if self.primary:
                atomic_write_json(self.rd.state_path, state)
                from undo_jax.undo.report import write_report

                write_report(self.rd, cfg)
            return state
        finally:
            self.close()


def _merge_usage(a: dict[str, dict], b: dict[str, dict]) -> dict[str, dict]:
    out = {k: dict(v) for k, v in a.items()}
    for name, entry in b.items():
        tgt = out.setdefault(name, dict.fromkeys(LEDGER_FIELDS, 0))
        for f in LEDGER_FIELDS:
            tgt[f] = tgt.get(f, 0) + entry.get(f, 0)
    return out


def run(cfg: RunConfig, *, teacher=None, progress: bool = False) -> dict[str, Any]:
    """Run (or resume) the loop described by `cfg`; returns the final state (best iteration and accuracies)."""
    return UndoRun(cfg, teacher=teacher, progress=progress).run()


__all__ = ["StudentError", "UndoError", "UndoRun", "run"]

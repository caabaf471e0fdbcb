"""The UNDO loop (docs/DESIGN.md): teacher rationales -> fine-tune -> evaluate -> gap analysis -> regenerate -> ...

Every stage of every iteration is persisted with a `<stage>.DONE` marker written after its outputs are
in place; a re-run of the same command skips finished stages and resumes the unfinished one (the teacher
cache makes its finished calls free, the trainer resumes from its Orbax checkpoint, evaluation from its
finished chunks). Process 0 alone talks to the teacher and writes shared files; every process loads,
trains, samples and checkpoints, and teacher data reaches the others through the run directory
(write, then barrier).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import time
from typing import Any

from undo_jax import distributed
from undo_jax.config import RunConfig, identity_defaults
from undo_jax.configtree import to_flag_lines, to_json
from undo_jax.errors import one_line
from undo_jax.undo.convergence import best_iteration, stop_reason
from undo_jax.undo.data_plan import Stage, choose_data_plan, ledger_delta, merge_usage, student_stage_names
from undo_jax.undo.prepare import UndoError, load_splits, make_run_mesh
from undo_jax.undo.rundir import RunDir, RunLock, atomic_write_json, atomic_write_jsonl, read_jsonl
from undo_jax.undo.student import (
    StudentError,
    evaluate_records,
    load_model,
    load_student,
    load_tokenizer,
    restore_into,
)
from undo_jax.undo.tensorboard import ScalarLog

log = logging.getLogger("undo_jax.undo")

# Per stage: teacher requests asked, finally failed, unusable at first, still unusable after the one retry.
TALLY_FIELDS = ("requests", "failed", "unusable", "unusable_after_retry")


class UndoRun:
    """One run of the loop over a run directory. `teacher` overrides the config-built teacher (tests)."""

    def __init__(self, cfg: RunConfig, *, teacher=None, progress: bool = False):
        self.cfg = cfg
        self.rd = RunDir(cfg.run_dir)
        self.primary = distributed.is_primary()
        self.progress = progress
        self.plan = choose_data_plan(cfg.loop)
        self._teacher = teacher
        self._owns_teacher = teacher is None
        self._model = None
        self._model_iter: int | None = None  # which iteration's parameters self._model holds (0 = base)
        self.mesh = None
        self.task = None
        self.splits: dict[str, list] = {}
        self.tally = dict.fromkeys(TALLY_FIELDS, 0)
        self.lock = RunLock(cfg.run_dir)
        self.scalars = ScalarLog(self.rd.root / "tb", enabled=cfg.output.tensorboard and self.primary)

    # ----- setup -------------------------------------------------------------------------------------------
    def check(self) -> None:
        """What can fail once JAX is up fails here, before the run directory is written: the task's data, the
        student's tokenizer, the mesh against the devices (cheaper checks: `undo_jax.preflight`, before JAX)."""
        if self.task is not None:
            return
        cfg = self.cfg
        problem = self.scalars.check()
        if problem:
            raise UndoError(problem)
        self.mesh = make_run_mesh(cfg.mesh, micro_batch=cfg.train.micro_batch)
        self.task, self.splits = load_splits(cfg.task)
        self.tokenizer = load_tokenizer(cfg.student.source)

    def preflight(self) -> None:
        """`check`, then (process 0) the run directory: lock, flags.txt, identity.json, config.json; the teacher."""
        cfg = self.cfg
        self.check()
        if self.primary:
            self.rd.ensure_writable()
            self.lock.acquire()
            if self.lock.previous:
                log.warning("took over the lock of a run that is gone (pid %s on %s)", self.lock.previous.get("pid"),
                            self.lock.previous.get("host"))
            self.rd.prepare(to_flag_lines(cfg), cfg.identity(), allow_change=cfg.output.allow_flag_change,
                            defaults=identity_defaults())
            atomic_write_json(self.rd.config_path, to_json(cfg))
        distributed.sync("undo-prepare")
        log.info("data: %d train, %d validation, %d test", *(len(self.splits[s]) for s in ("train", "validation",
                                                                                           "test")))
        if self.primary and self._teacher is None:
            self._teacher = self._make_teacher()

    def _make_teacher(self):
        from undo_jax.teachers import make_teacher

        try:
            return make_teacher(self.cfg.teacher, cache_path=str(self.rd.cache_path))
        except (ValueError, ImportError, OSError) as e:
            raise UndoError(f"--teacher={self.cfg.teacher.backend}: {e}") from None

    @property
    def teacher(self):
        if self._teacher is None:
            raise UndoError("internal: the teacher is used on process 0 only")
        return self._teacher

    @property
    def teacher_settings(self) -> dict[str, Any]:
        return {"temperature": self.cfg.teacher.temperature, "max_output_tokens": self.cfg.teacher.max_output_tokens}

    def close(self, error: str | None = None) -> None:
        self.scalars.close()
        self.lock.release(error)
        if self._owns_teacher and self._teacher is not None:
            self._teacher.close()
            self._teacher = None

    # ----- stage machinery ---------------------------------------------------------------------------------
    def stage(self, stage: Stage) -> dict[str, Any]:
        """Run a stage unless iter_k/<name>.DONE exists; record its wall time (and what it returns) in the marker."""
        k, name = stage.k, stage.name
        # One decision for all processes: one could read the marker before process 0 writes it, another after.
        if distributed.primary_decides(self.rd.is_done(k, name)):
            return self.rd.marker_info(k, name) or {}
        log.info("iteration %d: %s", k, name)
        if self.primary:
            self.lock.note(stage=f"{k}:{name}", stage_since=time.strftime("%Y-%m-%d %H:%M:%S"))
        start = time.time()
        info: dict[str, Any] = {}
        self.tally = dict.fromkeys(TALLY_FIELDS, 0)
        if self.primary or not stage.primary_only:
            info = stage.fn() or {}
        if self.tally["requests"]:
            info["teacher_quality"] = dict(self.tally)
        info["seconds"] = round(time.time() - start, 3)
        if self.primary:
            self.rd.mark_done(k, name, info)
        distributed.sync(f"undo-{name}-{k}")
        return info

    def ask_teacher(self, requests, *, problem=None) -> tuple[list, dict[str, dict]]:
        """The teacher's responses and ledger usage. An answer `problem(response)` finds unusable is asked
        once more (another cache salt, so the retry is cached too); what the stage asked, what finally failed
        and what stayed unusable is tallied in `self.tally` (recorded in the stage's marker)."""
        requests = list(requests)
        if not requests:
            return [], {}
        responses, usage = self._ask(requests)
        if problem is not None:
            weak = [i for i, r in enumerate(responses) if r.ok and problem(r)]
            self.tally["unusable"] += len(weak)
            if weak:
                again, more = self._ask([dataclasses.replace(requests[i], cache_salt=f"{requests[i].cache_salt}"
                                                             f"|retry-unusable") for i in weak])
                for i, response in zip(weak, again, strict=True):
                    responses[i] = response
                usage = merge_usage(usage, more)
                self.tally["unusable_after_retry"] += sum(r.ok and bool(problem(r)) for r in again)
        self.tally["requests"] += len(requests)
        self.tally["failed"] += sum(not r.ok for r in responses)
        return responses, usage

    def _ask(self, requests) -> tuple[list, dict[str, dict]]:
        before = self.teacher.ledger.to_dict()
        responses = self.teacher.generate(requests, progress=self.progress)
        return responses, ledger_delta(before, self.teacher.ledger.to_dict())

    # ----- what the data strategies read and write ---------------------------------------------------------
    def data_rows(self, k: int) -> list[dict[str, Any]]:
        return read_jsonl(self.rd.iter_dir(k) / "data.jsonl")

    def finish_data(self, k: int, rows: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
        """Write iteration k's data.jsonl, unless more of the stage's teacher calls failed than allowed: then
        stop (the stage stays unfinished, and a re-run asks exactly the failed requests again)."""
        failed, asked = self.tally["failed"], self.tally["requests"]
        allowed = self.cfg.loop.max_teacher_failures
        if failed and failed > allowed * asked:
            first = next((r["error"] for r in rows if r.get("error")), None) or "see the log"
            raise UndoError(f"iteration {k}: {failed} of {asked} teacher requests failed (more than "
                            f"--max_teacher_failures={allowed:g}; first: {first}); re-run to retry exactly those "
                            f"(the others are cached)")
        kept = sum(bool(r["kept"]) for r in rows)
        if kept == 0:
            errors = [r["error"] for r in rows if r.get("error")]
            hint = f"; first teacher error: {errors[0]}" if errors else ""
            raise UndoError(f"iteration {k}: no usable rationale among {len(rows)} (all wrong or failed){hint}")
        atomic_write_jsonl(self.rd.iter_dir(k) / "data.jsonl", rows)
        return {**info, "rows": len(rows), "kept": kept, "changed": sum(bool(r.get("changed")) for r in rows),
                "teacher_errors": sum(bool(r.get("error")) for r in rows),
                "failed_ids": [r["id"] for r in rows if r.get("error")]}

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

    # ----- student stages ----------------------------------------------------------------------------------
    def base_model(self):
        return load_model(self.cfg.student.source, param_dtype=self.cfg.student.param_dtype, mesh=self.mesh,
                          attention=self.cfg.student.attention, lora=self.cfg.student.lora_settings(),
                          seed=self.cfg.train.seed)

    def model_of(self, k: int):
        """The student after iteration k (0 = base), reusing the one in memory when it matches."""
        if self._model is None or self._model_iter != k:
            self._model, self._model_iter = self.load_iteration(k), k
        return self._model

    def load_iteration(self, k: int):
        """The student after iteration k, freshly loaded (the in-memory one is left as it is)."""
        model = self.base_model()
        if k > 0:
            try:
                restore_into(model, self.rd.iter_dir(k) / "checkpoint")
            except StudentError as e:
                raise StudentError(f"{e}; to retrain iteration {k}, move iter_{k}/checkpoint and iter_{k}/train.DONE "
                                   f"away and re-run") from None
        return model

    def starts_from(self, k: int) -> int:
        """The iteration whose student iteration k trains on (0 = the base)."""
        return 0 if (k == 1 or self.cfg.loop.retrain == "base") else k - 1

    def train_config(self, k: int):
        """The run's TrainConfig with this iteration's epochs (first: --epochs_first; later: --epochs_later)."""
        epochs = self.cfg.loop.epochs_first if self.starts_from(k) == 0 else self.cfg.loop.epochs_later
        return dataclasses.replace(self.cfg.train, epochs=epochs, progress=self.progress)

    def train_examples(self, k: int) -> list:
        from undo_jax.train import Example

        task = self.task
        by_id = {r.id: r for r in self.splits["train"]}
        rows = [r for r in self.data_rows(k) if r["kept"]]
        examples = [Example(prompt=task.prompt_messages(by_id[r["id"]]), completion=r["rationale"])
                    for r in rows if r["id"] in by_id]
        if not examples:
            raise UndoError(f"iteration {k}: no training examples in {self.rd.iter_dir(k) / 'data.jsonl'}")
        return examples

    # ----- logit distillation (--distill=logits) -----------------------------------------------------------
    def logit_teacher_source(self) -> str:
        lp = self.cfg.loop
        return lp.logit_teacher or self.cfg.teacher.model

    def tokenized_examples(self, k: int):
        from undo_jax.train import data as data_lib

        seqs, _ = data_lib.tokenize_examples(self.tokenizer, self.train_examples(k), self.train_config(k))
        if not seqs:
            raise UndoError(f"iteration {k}: every training prompt exceeds --max_length={self.cfg.train.max_length}")
        return seqs

    def logit_store(self):
        from undo_jax.train.teacher_logits import TeacherLogitStore, teacher_identity

        source = self.logit_teacher_source()
        return TeacherLogitStore(self.rd.root / "teacher_logits", teacher_identity(source), self.cfg.loop.kd_top_k)

    def load_logit_teacher(self, k: int):
        """The logit teacher on the run's mesh, checked to share the student's vocabulary."""
        from undo_jax.train.teacher_logits import TeacherLogitsError, check_same_vocabulary

        source = self.logit_teacher_source()
        student_config = self.model_of(self.starts_from(k)).config
        teacher, teacher_tok = load_student(source, param_dtype=self.cfg.student.param_dtype, mesh=self.mesh,
                                            attention=self.cfg.student.attention)
        try:
            check_same_vocabulary(source, teacher.config, teacher_tok, self.cfg.student.source, student_config,
                                  self.tokenizer)
        except TeacherLogitsError as e:
            raise UndoError(str(e)) from None
        return teacher

    def stage_teacher_logits(self, k: int) -> dict[str, Any]:
        """One teacher-forced pass of the logit teacher over iteration k's training tokens (cached on disk)."""
        from undo_jax.train.teacher_logits import TeacherLogitsError, compute_teacher_logits

        seqs = self.tokenized_examples(k)
        store = self.logit_store()
        source = self.logit_teacher_source()
        teacher = self.load_logit_teacher(k)
        try:
            counts = compute_teacher_logits(teacher, {str(i): s for i, s in enumerate(seqs)}, store,
                                            batch_size=self.cfg.eval.batch_size, mesh=self.mesh,
                                            progress=self.progress)
        except TeacherLogitsError as e:
            raise UndoError(str(e)) from None
        finally:
            del teacher  # the student trains next: free the teacher's memory
        return {**counts, "teacher": source, "top_k": store.k}

    def distilled_seqs(self, k: int):
        """Iteration k's tokenized examples with their stored teacher targets attached."""
        from undo_jax.train.teacher_logits import example_key

        store = self.logit_store()
        out = []
        for seq in self.tokenized_examples(k):
            key = example_key(store.teacher_id, store.k, seq)
            if key not in store:
                raise UndoError(f"iteration {k}: teacher logits missing under {store.folder}; move "
                                f"iter_{k}/teacher_logits.DONE away and re-run to compute them")
            out.append(dataclasses.replace(seq, teacher=store.get(key)))
        return out

    def stage_train(self, k: int) -> dict[str, Any]:
        from undo_jax.train import train, train_tokenized

        examples = self.train_examples(k)
        start_from = self.starts_from(k)
        model = self.model_of(start_from)
        self._model, self._model_iter = None, None  # trained in place: no longer iteration start_from's student
        config = self.train_config(k)
        ckpt = self.rd.iter_dir(k) / "checkpoint"
        try:
            log_path = self.rd.iter_dir(k) / "train_log.jsonl"
            if self.cfg.loop.distill == "logits":
                model = train_tokenized(model, self.distilled_seqs(k), config, mesh=self.mesh, checkpoint_dir=ckpt,
                                        log_path=log_path, base_source=self.cfg.student.source)
            elif self.cfg.loop.distill == "on_policy":
                from undo_jax.train.on_policy import OnPolicyTeacher

                seqs = self.distilled_seqs(k)
                # The teacher stays beside the student for the whole stage: it scores every on-policy step.
                teacher = OnPolicyTeacher(self.load_logit_teacher(k), self.tokenizer, self.cfg.loop.kd_top_k,
                                          batch_size=self.cfg.eval.batch_size)
                model = train_tokenized(model, seqs, config, mesh=self.mesh, checkpoint_dir=ckpt, log_path=log_path,
                                        on_policy=teacher, base_source=self.cfg.student.source)
                del teacher
            else:
                model = train(model, self.tokenizer, examples, config, mesh=self.mesh, checkpoint_dir=ckpt,
                              log_path=log_path, base_source=self.cfg.student.source)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise UndoError(f"iteration {k}: disk full while saving the checkpoint under {ckpt} ({e.strerror}); the "
                            f"previous checkpoint is intact: free space (or pass --keep_train_state=last/none) and "
                            f"re-run to resume from it") from None
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
        self.scalars.train_steps(read_jsonl(self.rd.iter_dir(k) / "train_log.jsonl"), step_offset=self.steps_before(k))
        return {"examples": len(examples), "epochs": config.epochs, "from_iteration": start_from,
                "distill": self.cfg.loop.distill}

    def steps_before(self, k: int) -> int:
        """Optimizer steps of iterations 1..k-1 (TensorBoard's training step counts on across iterations)."""
        total = 0
        for j in range(1, k):
            path = self.rd.iter_dir(j) / "train_log.jsonl"
            if path.is_file():
                total += max((int(r["step"]) for r in read_jsonl(path) if "loss" in r), default=0)
        return total

    def stage_eval(self, k: int, split: str) -> dict[str, Any]:
        name = {"validation": "eval_val", "test": "eval_test", "train": "eval_train"}[split]
        model = self.model_of(k)
        summary = evaluate_records(model, self.tokenizer, self.task, self.splits[split], self.cfg.eval,
                                   self.rd.iter_dir(k) / f"{name}.jsonl", mesh=self.mesh, progress=self.progress,
                                   write=self.primary)
        log.info("iteration %d: %s accuracy %.1f%% (%d/%d)", k, split, 100 * summary["accuracy"],
                 summary["correct"], summary["n"])
        self.scalars.accuracy(split, k, summary["accuracy"])
        return {"summary": summary}

    def stage_prune_state(self, k: int) -> dict[str, Any]:
        """--keep_train_state: replace the full training state (params + optimizer state) of finished iterations
        by a params-only snapshot (what later stages, `final/` and `evaluate` read): `last` keeps the state of
        iteration k only, `none` of no iteration, `all` of every one. Params are written (and complete) before
        the state is removed, so a kill in between leaves both."""
        import shutil

        from undo_jax.train import save_model_checkpoint
        from undo_jax.train.checkpoint import PARAMS_SUBDIR, STATE_SUBDIR

        keep = self.cfg.output.keep_train_state
        if keep == "all":
            return {"pruned": []}
        last = k if keep == "none" else k - 1
        pruned = []
        for j in range(1, last + 1):
            ckpt = self.rd.iter_dir(j) / "checkpoint"
            if not distributed.primary_decides((ckpt / STATE_SUBDIR).is_dir()):
                continue
            if not distributed.primary_decides((ckpt / PARAMS_SUBDIR).is_dir()):
                model = self._model if self._model_iter == j else self.load_iteration(j)
                # Every process takes part (Orbax writes sharded arrays).
                save_model_checkpoint(model, ckpt, base_source=self.cfg.student.source)
            distributed.sync(f"undo-prune-{j}")
            if self.primary:
                shutil.rmtree(ckpt / STATE_SUBDIR)
            pruned.append(j)
        return {"pruned": pruned}

    def student_stages(self, k: int) -> list[Stage]:
        fns = {"teacher_logits": lambda: self.stage_teacher_logits(k), "train": lambda: self.stage_train(k),
               "prune_state": lambda: self.stage_prune_state(k),
               "eval_val": lambda: self.stage_eval(k, "validation"), "eval_test": lambda: self.stage_eval(k, "test")}
        return [Stage(k, name, fns[name]) for name in student_stage_names(self.cfg.loop, k)]

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
            out.append({"iteration": k, "mode": self.cfg.loop.mode, "epochs": epochs,
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
        from undo_jax.models.lora import merged_model
        from undo_jax.models.peft_io import save_peft_adapter

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
            # A LoRA student exports merged (base + scale * A B) and, by flag, as a PEFT adapter folder too.
            save_pretrained(merged_model(model), final, tokenizer=self.tokenizer)
            if self.cfg.output.export_peft:
                save_peft_adapter(model, final / "peft_adapter", base_model_name_or_path=self.cfg.student.source)
            atomic_write_json(info_path, {"iteration": best, "student": self.cfg.student.source,
                                          "mode": self.cfg.loop.mode})
        distributed.sync("undo-export")

    def push_final(self) -> None:
        """--push_to_hub: upload final/ (and the report) to the hub repo."""
        repo = self.cfg.output.push_to_hub
        if repo:
            from undo_jax.hub import push_folder

            url = push_folder(self.rd.final_dir, repo, extra=[self.rd.report_path])
            log.info("final/ pushed to %s", url)

    # ----- the loop ----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        loop = self.cfg.loop
        error = None
        try:
            self.preflight()
            if loop.eval_base:
                for stage in self.student_stages(0):
                    self.stage(stage)
            reason = None
            k = 0
            while reason is None:
                k += 1
                for stage in [*self.plan.for_iteration(k).stages(self, k), *self.student_stages(k)]:
                    self.stage(stage)
                metrics = [m for m in self.write_metrics() if 1 <= m["iteration"] <= k]
                reason = stop_reason([m["val_accuracy"] for m in metrics], epsilon_points=loop.epsilon,
                                     patience=loop.patience, max_iterations=loop.max_iterations,
                                     early_stop=self.plan.early_stop)
            metrics = [m for m in self.write_metrics() if 1 <= m["iteration"] <= k]
            best = best_iteration([m["val_accuracy"] for m in metrics])
            self.export_final(best)
            state = {"iterations": k, "stop_reason": reason, "best_iteration": best,
                     "best_val_accuracy": metrics[best - 1]["val_accuracy"],
                     "best_test_accuracy": metrics[best - 1]["test_accuracy"]}
            if self.primary:
                atomic_write_json(self.rd.state_path, state)
                from undo_jax.undo.report import write_report

                write_report(self.rd, self.cfg)
                self.push_final()
            return state
        except BaseException as e:
            error = one_line(e)
            raise
        finally:
            self.close(error)


def run(cfg: RunConfig, *, teacher=None, progress: bool = False) -> dict[str, Any]:
    """Run (or resume) the loop described by `cfg`; returns the final state (best iteration and accuracies)."""
    return UndoRun(cfg, teacher=teacher, progress=progress).run()


__all__ = ["StudentError", "UndoError", "UndoRun", "run"]

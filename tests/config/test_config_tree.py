"""The configuration tree: every field round-trips through flags and config.json, flags are generated from the
tree alone, the library packages import no absl, and the checks name the flag."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from undo_jax import flags as cli
from undo_jax.config import EvalCommand, RunConfig, run_config
from undo_jax.configtree import (
    ConfigError,
    base_type,
    build,
    check_tree,
    flag_leaves,
    flat,
    from_json,
    leaves,
    section,
    setting,
    to_flag_lines,
    to_json,
)

REPO = Path(__file__).resolve().parents[2]


def non_default(leaf):
    """A valid value different from the leaf's default, derived from its type and declaration."""
    scalar, _ = base_type(leaf.type)
    if leaf.choices is not None:
        return next(c for c in leaf.choices if c != leaf.default)
    if scalar is bool:
        return not leaf.default
    if scalar is int:
        return 3 if leaf.default != 3 else 4
    if scalar is float:
        return 0.25 if leaf.default != 0.25 else 0.5
    return f"value-of-{leaf.flag}"


def everything_changed(tmp_path: Path) -> dict:
    values = {leaf.flag: non_default(leaf) for leaf in flag_leaves(RunConfig)}
    values.update(run_dir=str(tmp_path / "run"), data_source=str(tmp_path), batch_size=12, micro_batch=3,
                  mesh_data=-1, mesh_fsdp=2, mesh_tensor=2, task="gsm8k", teacher="openai", mode="undo",
                  teacher_thinking_budget=None, baseline_run=str(tmp_path), maj_k=3, eval_temperature=0.5,
                  lora_targets="q,v", distill="on_policy",  # on_policy: the --on_policy_* flags apply
                  teacher_batch_api=False, push_to_hub="org/student")
    (tmp_path / "prev").mkdir()
    (tmp_path / "prev" / "data.jsonl").write_text("")
    values["teacher_data_from"] = str(tmp_path / "prev")
    return values


def test_every_field_round_trips_through_flags_and_config_json(tmp_path):
    values = everything_changed(tmp_path)
    cfg = run_config(**values)
    defaults = flat(RunConfig())
    changed = {k for k, v in flat(cfg).items() if v != defaults[k]}
    # All but --mode (undo: --regenerate=wrong needs it), --teacher_thinking_budget and --teacher_batch_api (gemini
    # only) differ.
    assert changed == set(values) - {"mode", "teacher_thinking_budget", "teacher_batch_api"}, "a setting was lost"
    assert cli.parse(RunConfig, ["prog", *to_flag_lines(cfg)]) == cfg
    flagfile = tmp_path / "run.cfg"
    flagfile.write_text("\n".join(to_flag_lines(cfg)) + "\n")
    assert cli.parse(RunConfig, ["prog", f"--flagfile={flagfile}"]) == cfg
    assert from_json(RunConfig, json.loads(json.dumps(to_json(cfg)))) == cfg
    # Every leaf the flags cannot set is one the program sets per call (documented with flag=None).
    assert {".".join(leaf.path) for leaf in leaves(RunConfig) if leaf.flag is None} == {"train.epochs",
                                                                                      "train.progress"}


def test_eval_command_round_trips(tmp_path):
    values = {leaf.flag: non_default(leaf) for leaf in flag_leaves(EvalCommand)}
    values.update(task="svamp", data_source=str(tmp_path), mesh_data=1, mesh_fsdp=-1, mesh_tensor=2, maj_k=1,
                  lora_targets="q,v", from_run=None,
                  iteration=None)  # --from_run replaces the task/student/eval parts: tests/undo
    cfg = cli.parse(EvalCommand, ["prog", *to_flag_lines(build(EvalCommand, values))])
    assert flat(cfg) == values
    assert from_json(EvalCommand, to_json(cfg)) == cfg


@dataclasses.dataclass(frozen=True)
class Extra:
    attention: str = setting("dense", "Attention backend.", choices=("dense", "flash"))
    rank: int = setting(8, "LoRA rank.", min=1)


@dataclasses.dataclass(frozen=True)
class Tree:
    extra: Extra = section(Extra, title="extra", prefix="lora_")


def test_a_new_field_is_a_flag(tmp_path):
    """Adding a setting to a part of the tree is all it takes to get a flag (and its checks)."""
    fv = cli.flag_values(Tree)
    fv(["prog", "--lora_attention=flash", "--lora_rank=4"])
    assert (fv.lora_attention, fv.lora_rank) == ("flash", 4)
    with pytest.raises(ConfigError, match=r"^--lora_rank: must be >= 1, got 0$"):
        check_tree(build(Tree, {"lora_rank": 0}))


@pytest.mark.parametrize("flag, needle", [
    ("--clip_norm=-1", "--clip_norm: must be >= 0, got -1.0"),
    ("--schedule=step", "schedule"),
    ("--warmup_ratio=2", "--warmup_ratio: must be <= 1"),
    ("--max_teacher_failures=1.5", "--max_teacher_failures: must be <= 1"),
    ("--teacher_rpm=0", "--teacher_rpm: must be > 0"),
    ("--keep_train_state=some", "keep_train_state"),
])
def test_checks_name_the_flag(flag, needle):
    with pytest.raises(ConfigError) as err:
        cli.parse(RunConfig, ["prog", "--run_dir=r", "--student=s", flag])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_new_training_settings_reach_the_train_config():
    cfg = cli.parse(RunConfig, ["prog", "--run_dir=r", "--student=s", "--remat", "--loss_chunk=512",
                                "--clip_norm=0.5", "--weight_decay=0.1", "--schedule=linear"])
    assert (cfg.train.remat, cfg.train.loss_chunk, cfg.train.clip_norm, cfg.train.weight_decay,
            cfg.train.schedule) == (True, 512, 0.5, 0.1, "linear")
    assert cfg.train.keep == 1  # the run's default: one step checkpoint per iteration


def test_a_renamed_flag_says_what_to_use(monkeypatch, tmp_path):
    monkeypatch.setitem(cli.RENAMED, "old_name", "renamed to --new_name")
    with pytest.raises(ConfigError, match=r"^--old_name: renamed to --new_name$"):
        cli.parse(RunConfig, ["prog", "--run_dir=r", "--student=s", "--old_name=3"])
    flagfile = tmp_path / "f.cfg"
    flagfile.write_text("--noold_name\n")
    with pytest.raises(ConfigError, match="--old_name: renamed"):
        cli.parse(RunConfig, ["prog", f"--flagfile={flagfile}"])


def test_nothing_is_written_before_the_checks_pass(tmp_path):
    """config.json (and flags.txt, identity.json, run.lock) come only after the data, tokenizer and mesh checks;
    a finished run's config.json is read back in tests/undo/test_status.py (evaluate --from_run)."""
    from undo_jax.undo.loop import UndoRun
    from undo_jax.undo.student import StudentError

    cfg = run_config(run_dir=str(tmp_path / "run"), student=str(tmp_path / "missing"), data_source="demo",
                     val_size=4)
    with pytest.raises(StudentError, match="missing"):
        UndoRun(cfg).preflight()
    assert not (tmp_path / "run").exists()


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_library_packages_import_no_absl():
    """Only main.py / evaluate.py (through undo_jax.flags) know about absl; the loop is a library."""
    package = REPO / "undo_jax"
    for path in [*sorted((package / "undo").glob("*.py")), package / "config.py", package / "configtree.py"]:
        bad = {m for m in imported_modules(path) if m.split(".")[0] == "absl" or m.startswith("undo_jax.flags")}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"
    # And at run time: importing the loop does not register the command-line flags.
    code = "import sys, undo_jax.undo, undo_jax.config; print('undo_jax.flags' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_helpfull_groups_flags_by_part():
    out = subprocess.run([sys.executable, "-m", "undo_jax.main", "--helpfull"], cwd=REPO, capture_output=True,
                         text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0
    titles = [ln[:-1] for ln in out.stdout.splitlines() if ln and not ln.startswith(" ") and ln.endswith(":")]
    assert titles == ["command", "run directory", "task and data", "student", "teacher", "device mesh", "training",
                      "evaluation", "UNDO loop"]
    for leaf in flag_leaves(RunConfig):
        assert f"  --{leaf.flag}  (" in out.stdout



def test_an_older_run_dir_without_the_new_settings_resumes(tmp_path):
    """identity.json of a run made before a setting existed: the missing setting counts as its default."""
    from undo_jax.config import identity_defaults
    from undo_jax.undo.rundir import RunDir, RunDirError

    cfg = run_config(run_dir=str(tmp_path / "run"), student="s")
    old = {k: v for k, v in cfg.identity().items() if k not in ("eval_seed", "remat", "loss_chunk")}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "identity.json").write_text(json.dumps(old))
    rd = RunDir(tmp_path / "run")
    assert rd.prepare(to_flag_lines(cfg), cfg.identity(), allow_change=False, defaults=identity_defaults())
    rd.mark_done(0, "eval_val")  # a finished stage: from here on the flags must match
    changed = run_config(run_dir=str(tmp_path / "run"), student="s", remat=True)
    with pytest.raises(RunDirError, match="--remat=False"):
        rd.prepare(to_flag_lines(changed), changed.identity(), allow_change=False, defaults=identity_defaults())


def test_jax_free_choice_lists_match_the_models():
    # config.py and train/config.py keep copies so that the config tree imports without JAX.
    from undo_jax.config import ATTENTION_BACKENDS
    from undo_jax.models.attention import BACKENDS
    from undo_jax.models.decoder import REMAT_POLICIES as MODEL_POLICIES
    from undo_jax.train.config import REMAT_POLICIES

    assert ATTENTION_BACKENDS == BACKENDS
    assert ("none", *REMAT_POLICIES) == MODEL_POLICIES

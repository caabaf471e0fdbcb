"""Every command of the README's quickstarts, run in the cheapest variant that still checks it:

- `python -m undo_jax.main ...`: parsed and validated in-process exactly as `main` does (`parse_command`); a full
  run needs a key, the hub or hours. Its offline `--dry_run` (configs/gsm8k.cfg with the local GSM8K copy) runs
  as a subprocess in tests/undo/test_cli_run.py; the demo itself is CI's demo smoke step.
- `bash tools/demo.sh`: the flag file it runs is the one parsed here (the run: CI's demo smoke step).
- `evaluate`, `status`, `undo_jax.undo.report`: their flags parse, and every run directory they name is one an
  earlier README command writes (the paths match the configs); `--help` of each: tests/test_cli.py.
- `bash launch/*.sh`: run for real with `--dry-run` (the env file replaced by a temporary one).
- the Python API block: executed up to the `run(...)` call, which is checked to be the loop's entry point.
"""

from __future__ import annotations

import inspect
import os
import re
import shlex
import subprocess
from pathlib import Path

from undo_jax.config import EvalCommand, RunConfig
from undo_jax.flags import flag_values, parse_command

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def blocks(lang: str) -> list[str]:
    start = README.index("## Quickstarts")
    return re.findall(rf"```{lang}\n(.*?)```", README[start:], flags=re.S)


def commands() -> list[list[str]]:
    out = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line:
                out.append(shlex.split(line))
    return out


def test_every_quickstart_command(tmp_path):
    cmds = commands()
    assert len(cmds) >= 14
    written: set[str] = set()  # run directories that README commands write
    env_file = tmp_path / "gemini.env"
    env_file.write_text("GEMINI_API_KEY=not-a-key\n")
    checked = 0
    for argv in cmds:
        if argv[:1] == ["echo"]:
            continue
        if argv[:2] == ["bash", "tools/demo.sh"]:
            assert "undo_jax.main --flagfile=configs/demo.cfg" in (REPO / "tools" / "demo.sh").read_text()
            written.add(parse_command(RunConfig, ["main", "--flagfile=configs/demo.cfg"]).cfg.run_dir)
        elif argv[:2] == ["bash", "launch/gpu_host.sh"] or argv[:2] == ["bash", "launch/tpu_vm.sh"]:
            args = [a if not a.startswith("--env-file=") else f"--env-file={env_file}" for a in argv]
            proc = subprocess.run([*args, "--dry-run"], cwd=REPO, text=True, capture_output=True, timeout=60,
                                  env=dict(os.environ, TMPDIR=str(tmp_path)))
            assert proc.returncode == 0, (argv, proc.stderr)
            assert "undo_jax.main --flagfile=configs/gsm8k.cfg" in proc.stdout
            assert "[gemini]" in proc.stdout and "constraints.txt" in proc.stdout
            flagfile = next(a for a in argv if a.startswith("--flagfile="))
            written.add(parse_command(RunConfig, ["main", flagfile]).cfg.run_dir)
        elif argv[:3] == ["python", "-m", "undo_jax.main"]:
            command = parse_command(RunConfig, ["main", *argv[3:]])
            if "dry_run" not in command.actions:
                written.add(command.cfg.run_dir)
        elif argv[:3] == ["python", "-m", "undo_jax.evaluate"]:
            flag_values(EvalCommand)(["evaluate", *argv[3:]])  # unknown flags or positionals raise
            for arg in argv[3:]:
                if arg.startswith(("--from_run=", "--student=runs/")):
                    path = arg.split("=", 1)[1].removesuffix("/final")
                    assert path in written, f"{arg}: no earlier README command writes {path}"
        elif argv[:3] in (["python", "-m", "undo_jax.status"], ["python", "-m", "undo_jax.undo.report"]):
            for path in argv[3:]:
                assert path in written, f"{' '.join(argv)}: no earlier README command writes {path}"
        else:
            raise AssertionError(f"README command this test does not know how to check: {' '.join(argv)}")
        checked += 1
    assert checked == len([c for c in cmds if c[:1] != ["echo"]])


def test_the_python_api_block():
    (block,) = blocks("python")
    before_run = block[: block.index("print(run(")]
    namespace: dict = {}
    exec(compile(before_run, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    cfg = namespace["cfg"]
    assert isinstance(cfg, RunConfig) and cfg.run_dir == "runs/api-demo" and cfg.task.data_source == "demo"
    from undo_jax.undo.loop import run

    assert namespace["run"] is run and list(inspect.signature(run).parameters)[0] == "cfg"

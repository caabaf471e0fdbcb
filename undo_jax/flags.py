"""absl flags generated from a configuration tree (`undo_jax.config`), for `main` and `evaluate` only.

`flag_values(RunConfig)` defines one flag per tree leaf (name, type, default, choices and help from the
declaration) in a FlagValues of its own; `parse(RunConfig, argv)` reads the command line (and flag files)
into a validated tree. A flag that was removed or renamed is refused with one line saying what to use.
`configtree.to_flag_lines(cfg)` writes a tree back as a flag file (a run directory's flags.txt).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from absl import flags

from undo_jax.config import EvalCommand, RunConfig, from_run, validate, validate_eval
from undo_jax.configtree import ConfigError, base_type, build, flag_leaves, to_flag_lines
from undo_jax.errors import one_line

# Old flag name -> what to say instead (none renamed yet; add an entry when one is).
RENAMED: dict[str, str] = {}
__all__ = ["RENAMED", "Command", "flag_values", "help_text", "parse", "parse_command", "parse_or_exit",
           "start_command", "to_flag_lines"]
VALIDATORS = {RunConfig: validate, EvalCommand: validate_eval}
HELP_FLAGS = ("-h", "--help", "-help", "--helpfull", "-helpfull", "--helpshort", "-?")
# The program of each tree (error messages name the command a misplaced flag belongs to).
PROGRAMS = {RunConfig: "undo_jax.main", EvalCommand: "undo_jax.evaluate"}
# What the command does instead of its job: flags of the command, not settings of the tree (never in flags.txt).
ACTION_TITLE = "command"
ACTIONS: dict[type, dict[str, str]] = {
    RunConfig: {"dry_run": "Print the resolved config, split sizes, the stages it would run, the teacher call/token/"
                           "cost bounds and the disk and memory estimates; write nothing.",
                "status": "Print where the run in --run_dir stands (as `python -m undo_jax.status RUN`) and exit."},
    EvalCommand: {},
}


@dataclasses.dataclass(frozen=True)
class Command:
    """A parsed command line: the validated tree (None with --status), the actions asked, the raw run dir."""

    cfg: Any
    actions: frozenset[str]
    run_dir: str | None = None


def flag_values(cls: type) -> flags.FlagValues:
    """A FlagValues holding one flag per leaf of tree class `cls` (grouped by section for --helpfull), plus the
    command's action flags (`ACTIONS`)."""
    fv = flags.FlagValues()
    for name, text in ACTIONS.get(cls, {}).items():
        flags.DEFINE_bool(name, False, text, flag_values=fv, module_name=ACTION_TITLE)
    for leaf in flag_leaves(cls):
        scalar, _ = base_type(leaf.type)
        kwargs: dict[str, Any] = {"flag_values": fv, "module_name": leaf.section}
        if leaf.choices is not None:
            flags.DEFINE_enum(leaf.flag, leaf.default, [str(c) for c in leaf.choices], leaf.help, **kwargs)
        elif scalar is bool:
            flags.DEFINE_bool(leaf.flag, leaf.default, leaf.help, **kwargs)
        elif scalar is int:
            flags.DEFINE_integer(leaf.flag, leaf.default, leaf.help, **kwargs)
        elif scalar is float:
            flags.DEFINE_float(leaf.flag, leaf.default, leaf.help, **kwargs)
        elif scalar is str:
            flags.DEFINE_string(leaf.flag, leaf.default, leaf.help, **kwargs)
        else:
            raise TypeError(f"{cls.__name__}: setting --{leaf.flag} has type {leaf.type}, which has no flag kind")
    return fv


def _check_renamed(args: list[str]) -> None:
    for arg in args:
        if not arg.startswith("-"):
            continue
        name = arg.lstrip("-").split("=", 1)[0]
        for candidate in (name, name[2:] if name.startswith("no") else None):
            if candidate in RENAMED:
                raise ConfigError(f"--{candidate}: {RENAMED[candidate]}")


def _unknown_flag(cls: type, name: str) -> str:
    """The one line for an unknown flag: which other command it belongs to, if any."""
    for other, prog in PROGRAMS.items():
        if other is not cls and name in {leaf.flag for leaf in flag_leaves(other)} | set(ACTIONS.get(other, {})):
            return f"--{name}: not a flag of {PROGRAMS[cls]} (it is one of {prog}'s); see --help"
    return f"--{name}: not a flag of {PROGRAMS.get(cls, cls.__name__)}; see --help"


def _read(cls: type, argv: list[str]) -> flags.FlagValues:
    fv = flag_values(cls)
    try:
        expanded = fv.read_flags_from_files(list(argv[1:]), force_gnu=False)
    except flags.Error as e:
        raise ConfigError(one_line(e)) from None
    _check_renamed(expanded)
    try:
        rest = fv([argv[0], *expanded], known_only=False)
    except flags.UnrecognizedFlagError as e:
        raise ConfigError(_unknown_flag(cls, e.flagname)) from None
    except flags.Error as e:
        raise ConfigError(one_line(e)) from None
    if len(rest) > 1:
        raise ConfigError(f"{rest[1]!r}: positional arguments are not accepted (settings are --name=value flags; "
                          f"see --help)")
    return fv


def parse_command(cls: type, argv: list[str]) -> Command:
    """The command line as a `Command`: the validated tree and the action flags (ConfigError: one line)."""
    fv = _read(cls, argv)
    actions = frozenset(name for name in ACTIONS.get(cls, {}) if fv[name].value)
    values = {leaf.flag: fv[leaf.flag].value for leaf in flag_leaves(cls)}
    if "status" in actions:  # only the run directory matters; the rest need not validate
        if not values.get("run_dir"):
            raise ConfigError("--status: needs --run_dir (or use `python -m undo_jax.status RUN`)")
        return Command(None, actions, values["run_dir"])
    cfg = build(cls, values)
    if cls is EvalCommand:  # --from_run fills the task, student and evaluation parts from the run
        cfg = from_run(cfg, frozenset(leaf.flag for leaf in flag_leaves(cls) if fv[leaf.flag].present))
    return Command(VALIDATORS[cls](cfg), actions, values.get("run_dir"))


def parse(cls: type, argv: list[str]):
    """The validated `cls` tree of a command line (argv[0] is the program). ConfigError: one line."""
    command = parse_command(cls, argv)
    if command.actions:
        raise ConfigError(f"--{sorted(command.actions)[0]}: an action flag, not a setting")
    return command.cfg


def help_text(cls: type, prog: str, description: str = "") -> str:
    """--help/--helpfull: every flag with its type and default, grouped by the part of the tree it configures."""
    fv = flag_values(cls)
    out = [f"usage: python -m {prog} [--flagfile=FILE] [--flag=value ...]"]
    if description:
        out += ["", description]
    groups: dict[str, list[tuple[str, str, str]]] = {}
    for name, text in ACTIONS.get(cls, {}).items():
        groups.setdefault(ACTION_TITLE, []).append((name, text, "bool; default: false"))
    for leaf in flag_leaves(cls):
        flag = fv[leaf.flag]
        kind = "|".join(map(str, leaf.choices)) if leaf.choices else flag.flag_type()
        default = (flag.default_as_str or "none").strip("'")
        groups.setdefault(leaf.section, []).append((leaf.flag, leaf.help, f"{kind}; default: {default}"))
    for title, entries in groups.items():
        out.append(f"\n{title}:")
        for name, text, kind in entries:
            out += [f"  --{name}  ({kind})", f"      {text}"]
    out.append("\nFlag files: one --flag=value per line, # comments; later flags override earlier ones.")
    return "\n".join(out) + "\n"


def wants_help(argv: list[str]) -> bool:
    return any(a in HELP_FLAGS for a in argv[1:])


NOISY_LOGGERS = ("absl", "jax._src", "httpx", "httpx2", "google_genai")


def start_process() -> None:
    """The multi-host start, which must precede every other JAX call."""
    from undo_jax import distributed

    distributed.maybe_initialize()


def start_logging() -> None:
    """INFO logging to stderr; called once every check has passed, so an error is the only line before it."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def start_command(cls: type, argv: list[str], prog: str):
    """Parse the flags (`parse_or_exit`), start the process and logging; the validated tree."""
    command = parse_or_exit(cls, argv, prog)
    start_process()
    start_logging()
    return command.cfg


def fail(prog: str, e: BaseException | str, code: int = 1) -> int:
    """Print the one error line of a command; its exit status."""
    print(f"{prog}: error: {e if isinstance(e, str) else one_line(e)}", file=sys.stderr)
    return code


def parse_or_exit(cls: type, argv: list[str], prog: str, description: str = "") -> Command:
    """`parse_command`, printing help and exiting 0 for --help/--helpfull, or one line and exit 2 on a bad flag."""
    if wants_help(argv):
        sys.stdout.write(help_text(cls, prog, description))
        raise SystemExit(0)
    try:
        return parse_command(cls, argv)
    except ConfigError as e:
        raise SystemExit(fail(prog, e, 2)) from None

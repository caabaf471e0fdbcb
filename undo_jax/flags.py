"""absl flags generated from a configuration tree (`undo_jax.config`), for `main` and `evaluate` only.

`flag_values(RunConfig)` defines one flag per tree leaf (name, type, default, choices and help from the
declaration) in a FlagValues of its own; `parse(RunConfig, argv)` reads the command line (and flag files)
into a validated tree. A flag that was removed or renamed is refused with one line saying what to use.
`configtree.to_flag_lines(cfg)` writes a tree back as a flag file (a run directory's flags.txt).
"""

from __future__ import annotations

import sys
from typing import Any

from absl import flags

from undo_jax.config import EvalCommand, RunConfig, validate, validate_eval
from undo_jax.configtree import ConfigError, base_type, build, flag_leaves, to_flag_lines
from undo_jax.errors import one_line

# Old flag name -> what to say instead (none renamed yet; add an entry when one is).
RENAMED: dict[str, str] = {}
__all__ = ["RENAMED", "flag_values", "help_text", "parse", "parse_or_exit", "start_command", "to_flag_lines"]
VALIDATORS = {RunConfig: validate, EvalCommand: validate_eval}
HELP_FLAGS = ("-h", "--help", "-help", "--helpfull", "-helpfull", "--helpshort", "-?")


def flag_values(cls: type) -> flags.FlagValues:
    """A FlagValues holding one flag per leaf of tree class `cls` (grouped by section for --helpfull)."""
    fv = flags.FlagValues()
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


def parse(cls: type, argv: list[str]):
    """The validated `cls` tree of a command line (argv[0] is the program). ConfigError: one line."""
    fv = flag_values(cls)
    try:
        expanded = fv.read_flags_from_files(list(argv[1:]), force_gnu=False)
    except flags.Error as e:
        raise ConfigError(one_line(e)) from None
    _check_renamed(expanded)
    try:
        fv([argv[0], *expanded], known_only=False)
    except flags.Error as e:
        raise ConfigError(one_line(e)) from None
    values = {leaf.flag: fv[leaf.flag].value for leaf in flag_leaves(cls)}
    return VALIDATORS[cls](build(cls, values))


def help_text(cls: type, prog: str) -> str:
    """--helpfull: every flag, grouped by the part of the tree it configures."""
    fv = flag_values(cls)
    out = [f"usage: python -m {prog} [--flagfile=FILE] [--flag=value ...]"]
    for section in dict.fromkeys(leaf.section for leaf in flag_leaves(cls)):
        out.append(f"\n{section}:")
        for leaf in flag_leaves(cls):
            if leaf.section != section:
                continue
            flag = fv[leaf.flag]
            kind = "|".join(map(str, leaf.choices)) if leaf.choices else flag.flag_type()
            default = (flag.default_as_str or "none").strip("'")
            out.append(f"  --{leaf.flag}  ({kind}; default: {default})")
            out.append(f"      {leaf.help}")
    return "\n".join(out) + "\n"


def wants_help(argv: list[str]) -> bool:
    return any(a in HELP_FLAGS for a in argv[1:])


NOISY_LOGGERS = ("absl", "jax._src", "httpx", "httpx2", "google_genai")


def start_command(cls: type, argv: list[str], prog: str):
    """What `main` and `evaluate` do first: parse the flags (`parse_or_exit`), then start the process (the
    multi-host start, which must precede every other JAX call, and INFO logging to stderr)."""
    import logging

    cfg = parse_or_exit(cls, argv, prog)
    from undo_jax import distributed

    distributed.maybe_initialize()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return cfg


def parse_or_exit(cls: type, argv: list[str], prog: str):
    """`parse`, printing help and exiting 0 for --help/--helpfull, or one line and exit 2 on a bad flag."""
    if wants_help(argv):
        sys.stdout.write(help_text(cls, prog))
        raise SystemExit(0)
    try:
        return parse(cls, argv)
    except ConfigError as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None

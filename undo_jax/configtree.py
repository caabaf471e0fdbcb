"""The machinery of the typed configuration tree: declared settings, their checks, names and JSON form.

A configuration is a tree of frozen dataclasses. A leaf field is declared with `setting(default, help, ...)`
(its checks, its choices, whether it decides a run's results); a branch field with `section(cls, ...)`
(its flag-name prefix and its help-group title). Every leaf has one user-facing name, its *flag name*
(`prefix + field name`, or the `flag=` override), used by the command line, flags.txt, identity.json and
error messages alike. Adding a field to a class is all it takes to add a flag (`undo_jax.flags` generates
them); nothing here imports absl.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator
from typing import Any


class ConfigError(ValueError):
    """A setting is missing, malformed or inconsistent (message: one line naming the flag)."""


def setting(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,  # noqa: A002
            gt: float | None = None, max: float | None = None, flag: str | None = "",  # noqa: A002
            identity: bool = True) -> Any:
    """A leaf field. `flag=None` keeps it off the command line (set by the program); `identity=False` marks
    bookkeeping that a resumed run may change without changing results."""
    meta = {"help": help, "choices": choices, "min": min, "gt": gt, "max": max, "flag": flag, "identity": identity}
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, *, title: str, prefix: str = "", default: Any = None) -> Any:
    """A branch field holding a `cls` (default: `cls()`); its leaves' flag names start with `prefix`."""
    factory = cls if default is None else (lambda: default)
    return dataclasses.field(default_factory=factory, metadata={"section": True, "prefix": prefix, "title": title})


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One leaf of a tree class: where it is (`path`), its flag name, type and declaration."""

    path: tuple[str, ...]
    flag: str
    type: Any
    default: Any
    help: str
    choices: tuple | None
    identity: bool
    section: str  # the title of the section holding it (the --helpfull group)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def is_section(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("section"))


def leaves(cls: type, *, default: Any = None, prefix: str = "", path: tuple[str, ...] = (),
           title: str = "") -> Iterator[Leaf]:
    """Every leaf of tree class `cls` in declaration order (leaves with `flag=None` included)."""
    hints = _hints(cls)
    instance = cls() if default is None else default
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if is_section(f):
            yield from leaves(hints[f.name], default=value, prefix=f.metadata["prefix"], path=(*path, f.name),
                              title=f.metadata["title"])
            continue
        override = f.metadata.get("flag", "")
        flag = None if override is None else (override or prefix + f.name)
        yield Leaf(path=(*path, f.name), flag=flag, type=hints[f.name], default=value,
                   help=f.metadata.get("help", ""), choices=f.metadata.get("choices"),
                   identity=f.metadata.get("identity", True), section=title)


def flag_leaves(cls: type) -> list[Leaf]:
    """The leaves that are command-line flags; raises if two share a name (a tree declaration bug)."""
    out, seen = [], {}
    for leaf in leaves(cls):
        if leaf.flag is None:
            continue
        if leaf.flag in seen:
            raise TypeError(f"{cls.__name__}: flag --{leaf.flag} is declared twice ({'.'.join(seen[leaf.flag])} "
                            f"and {'.'.join(leaf.path)})")
        seen[leaf.flag] = leaf.path
        out.append(leaf)
    return out


def base_type(tp: Any) -> tuple[type, bool]:
    """(scalar type, optional) of a leaf annotation such as `int`, `str | None`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported setting type {tp}")
        return args[0], True
    return tp, False


def get(cfg: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        cfg = getattr(cfg, name)
    return cfg


def flat(cfg: Any) -> dict[str, Any]:
    """Flag name -> value of every flag leaf of `cfg`."""
    return {leaf.flag: get(cfg, leaf.path) for leaf in flag_leaves(type(cfg))}


def to_flag_lines(cfg: Any) -> list[str]:
    """The tree as flag-file lines (None values are left out: they mean the flag's default)."""
    lines = []
    for name, value in flat(cfg).items():
        if value is None:
            continue
        if isinstance(value, bool):
            lines.append(f"--{name}" if value else f"--no{name}")
        else:
            lines.append(f"--{name}={value}")
    return lines


def build(cls: type, values: dict[str, Any]) -> Any:
    """A `cls` tree from flag name -> value (missing names keep their defaults). Raises ConfigError on an
    unknown name."""
    by_flag = {leaf.flag: leaf for leaf in flag_leaves(cls)}
    unknown = sorted(set(values) - set(by_flag))
    if unknown:
        raise ConfigError(f"--{unknown[0]}: not a setting of {cls.__name__}")
    nested: dict[tuple[str, ...], Any] = {by_flag[name].path: value for name, value in values.items()}
    return _build(cls, (), nested, None)


def _build(cls: type, path: tuple[str, ...], nested: dict, default: Any) -> Any:
    hints = _hints(cls)
    instance = cls() if default is None else default
    kwargs = {}
    for f in dataclasses.fields(cls):
        here = (*path, f.name)
        if is_section(f):
            kwargs[f.name] = _build(hints[f.name], here, nested, getattr(instance, f.name))
        elif here in nested:
            kwargs[f.name] = nested[here]
    return dataclasses.replace(instance, **kwargs)


def to_json(cfg: Any) -> dict[str, Any]:
    """The nested dict of a tree (config.json)."""
    return dataclasses.asdict(cfg)


def from_json(cls: type, data: dict[str, Any]) -> Any:
    """Inverse of `to_json`; a key the tree does not have raises ConfigError naming it."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"config.json: {cls.__name__} has no field {unknown[0]!r}")
    kwargs = {}
    for name, value in data.items():
        if is_section(fields[name]):
            kwargs[name] = from_json(hints[name], value)
        else:
            kwargs[name] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(cls(), **kwargs)


def check_fields(obj: Any, *, flag_names: dict[str, str] | None = None) -> None:
    """Check the declared bounds and choices of `obj`'s own leaves; ConfigError (one line) on the first problem.

    Messages name the field by its flag name (`flag_names` maps field -> flag name; default: the field name).
    """
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if is_section(f):
            continue
        value = getattr(obj, f.name)
        override = f.metadata.get("flag") or f.name
        name = (flag_names or {}).get(f.name, override)
        scalar, optional = base_type(hints[f.name])
        if value is None:
            if not optional:
                raise ConfigError(f"--{name}: is required")
            continue
        if scalar is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if scalar in (int, float) and (isinstance(value, bool) or not isinstance(value, scalar)):
            raise ConfigError(f"--{name}: expected {scalar.__name__}, got {value!r}")
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"--{name}: must be one of {', '.join(map(str, choices))}, got {value!r}")
        low, above, high = f.metadata.get("min"), f.metadata.get("gt"), f.metadata.get("max")
        if low is not None and value < low:
            raise ConfigError(f"--{name}: must be >= {low}, got {value}")
        if above is not None and value <= above:
            raise ConfigError(f"--{name}: must be > {above}, got {value}")
        if high is not None and value > high:
            raise ConfigError(f"--{name}: must be <= {high}, got {value}")


def check_tree(cfg: Any, *, prefix: str = "") -> None:
    """`check_fields` on every section of a tree, naming each leaf by its flag name."""
    names = {}
    for f in dataclasses.fields(cfg):
        if is_section(f):
            check_tree(getattr(cfg, f.name), prefix=f.metadata["prefix"])
        else:
            names[f.name] = f.metadata.get("flag") or prefix + f.name
    check_fields(cfg, flag_names=names)

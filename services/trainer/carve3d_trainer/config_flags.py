"""Every setting of :class:`~.config.TrainConfig` as a command-line flag, with its default in ``--help``.

The setting ``section.some_name`` is the flag ``--section.some-name`` (``run_dir`` is ``--run-dir``,
``algorithm.kl_budget`` is ``--algorithm.kl-budget``, ``reward.metric.view_size`` is
``--reward.metric.view-size``), and ``--set section.some_name=VALUE`` sets it too. A value is text for
settings that take text or a path; otherwise JSON (``0.2``, ``true``, ``null``, ``["to_q", "to_k"]``).
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from carve3d_reward.errors import ConfigError

from .config import TrainConfig

#: Older spellings of some flags, kept working.
ALIASES = {"reward.mode": ("--reward",), "reward.url": ("--reward-url",), "policy.path": ("--policy-path",)}
_DEST = "setting:"  # the namespace attribute of setting ``k`` is ``setting:k``
_TEXT = (str, Path, SecretStr)


def settings(model: type[BaseModel] = TrainConfig, prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """``(dotted key, field)`` of every setting, sections expanded, in declaration order."""
    for name, field in model.model_fields.items():
        section = _section(field.annotation)
        if section is None:
            yield prefix + name, field
        else:
            yield from settings(section, f"{prefix}{name}.")


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per setting, grouped by section; unset flags leave the setting to ``--set``, the file, the env."""
    about = {name: text.replace("%", "%%") for name, text in _sections()}
    groups: dict[str, Any] = {}
    for key, field in settings():
        section = key.rpartition(".")[0]
        if section not in groups:
            title = f"settings: {section}" if section else "settings"
            groups[section] = parser.add_argument_group(title, about[section] or None)
        groups[section].add_argument(
            flag(key),
            *ALIASES.get(key, ()),
            dest=_DEST + key,
            default=argparse.SUPPRESS,
            metavar=_metavar(field.annotation),
            help=_help(field),
        )


def flag_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags, as dotted keys with parsed values."""
    given = {k.removeprefix(_DEST): v for k, v in vars(args).items() if k.startswith(_DEST)}
    return {key: parse_value(key, raw) for key, raw in given.items()}


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` items as dotted keys with parsed values."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set algorithm.beta=0")
        out[key] = parse_value(key, raw)
    return out


def parse_value(key: str, raw: str) -> Any:
    """``raw`` as setting ``key`` takes it: text for text and paths (``null`` for none, where allowed), else
    JSON, else the text itself (for the config's validation to judge)."""
    field = dict(settings()).get(key)
    if field is not None:
        kinds = _union_members(field.annotation)
        if raw == "null" and type(None) in kinds:
            return None
        if any(k in _TEXT or typing.get_origin(k) is Literal for k in kinds):
            return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _union_members(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _section(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _sections(
    model: type[BaseModel] = TrainConfig, name: str = "", about: str | None = None
) -> Iterator[tuple[str, str]]:
    """``(dotted name, what it is)`` of every section: its field's description, else its class's docstring."""
    yield name, about or (model.__doc__ or "").strip().split("\n")[0].replace("``", "")
    for field_name, field in model.model_fields.items():
        section = _section(field.annotation)
        if section is not None:
            yield from _sections(section, f"{name}.{field_name}".lstrip("."), field.description)


def _metavar(annotation: Any) -> str:
    names = []
    for kind in _union_members(annotation):
        if kind is type(None):
            names.append("null")
        elif typing.get_origin(kind) is Literal:
            names.append("{" + ",".join(str(a) for a in typing.get_args(kind)) + "}")
        elif typing.get_origin(kind) is list:
            names.append("JSON-LIST")
        else:
            names.append({bool: "BOOL", int: "INT", float: "FLOAT", Path: "PATH"}.get(kind, "TEXT"))
    return "|".join(names)


def _help(field: FieldInfo) -> str:
    default = field.get_default(call_default_factory=True)
    if isinstance(default, SecretStr):
        shown = "set (hidden)"
    elif default is None or isinstance(default, bool | list):
        shown = json.dumps(default)
    else:
        shown = str(default)
    text = f"{field.description} (default: {shown})" if field.description else f"(default: {shown})"
    return text.replace("%", "%%")

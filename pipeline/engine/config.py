"""The project config `pipeline.toml`: inputs, cache, model and every stage's params in one file.

Precedence: built-in defaults < pipeline.toml < command-line flags. The file's sections are the
commands (`[embed]`, `[retrieve]`, `[optimize]`, `[run]`); top-level keys (`cache`) apply to every
command that has that option. Keys are the option names with `_` or `-` (`clip_model`, `clip-model`).
The file is checked against the commands' own options, so an unknown key or a wrong type is a one-line
error naming the key, before any work starts.
"""

from __future__ import annotations

import inspect
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigError

DEFAULT_CONFIG = Path("pipeline.toml")
# `[storage_options.PROTOCOL]` tables: fsspec options for URLs of that protocol (storage/remote.configure)
STORAGE_OPTIONS = "storage_options"
SKIPPED_OPTIONS = {"help", "dry_run", "config"}  # per-invocation flags, not project settings


def stage_sections() -> tuple[str, ...]:
    """The sections pipeline.toml may have: one per stage (feature_cache/steps.py), and [run]."""
    from feature_cache.steps import stage_names

    return (*stage_names(), "run")


def _toml():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib


def read_config(path: Path | None) -> dict[str, Any]:
    """The raw TOML dict; {} when no path is given and ./pipeline.toml does not exist."""
    if path is None:
        if not DEFAULT_CONFIG.is_file():
            return {}
        path = DEFAULT_CONFIG
    try:
        with open(path, "rb") as f:
            return _toml().load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: file not found") from None
    except (_toml().TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


@dataclass(frozen=True)
class Option:
    """One option of a command, read from the command function's signature."""

    name: str
    kind: str | None  # "list" | "bool" | "int" | "float" | "str" | None (anything)
    default: Any
    help: str


def command_options(function: Callable) -> list[Option]:
    """The options of a Typer command function, from its `Annotated[...]` signature."""
    function = inspect.unwrap(function)
    hints = typing.get_type_hints(function, include_extras=True)
    options = []
    for name, parameter in inspect.signature(function).parameters.items():
        if name in SKIPPED_OPTIONS or name == "ctx":
            continue
        hint, help_text = hints.get(name), ""
        if typing.get_origin(hint) is typing.Annotated:
            hint, *meta = typing.get_args(hint)
            help_text = next((getattr(m, "help", "") or "" for m in meta if hasattr(m, "help")), "")
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and args else hint
        kind = {bool: "bool", int: "int", float: "float", str: "str", Path: "str"}.get(base)
        if typing.get_origin(base) in (list, tuple):
            kind = "list"
        default = None if parameter.default is inspect.Parameter.empty else parameter.default
        options.append(Option(name, kind, default, help_text))
    return options


def _check_type(where: str, value: Any, expected: str | None) -> Any:
    ok = {
        None: True,
        "list": isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value),
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
    }[expected]
    if not ok:
        raise ConfigError(f"{where}: expected {_WORDS[expected]}, got {value!r}")
    return [str(v) for v in value] if expected == "list" else value


_WORDS = {
    "list": "a list",
    "bool": "true or false",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
}


def default_map(
    raw: dict[str, Any], commands: dict[str, Callable], source: str = "pipeline.toml"
) -> dict[str, dict]:
    """Validate the TOML against the command functions and turn it into click's `default_map`."""
    top = {k.replace("-", "_"): v for k, v in raw.items() if not isinstance(v, dict)}
    sections = {k: v for k, v in raw.items() if isinstance(v, dict) and k != STORAGE_OPTIONS}
    for name in sections:
        if name not in stage_sections():
            raise ConfigError(f"{source}: unknown section [{name}] (sections: {', '.join(stage_sections())})")
    known_top = {"cache"}
    for key in top:
        if key not in known_top:
            raise ConfigError(
                f"{source}: unknown top-level key '{key}'; stage settings go in a section such as [embed]"
            )
    result: dict[str, dict] = {}
    for name, command in commands.items():
        params = {o.name: o for o in command_options(command)}
        values: dict[str, Any] = {}
        for key, value in top.items():
            if key in params:
                values[key] = _check_type(f"{source}: {key}", value, params[key].kind)
        for key, value in sections.get(name, {}).items():
            key = key.replace("-", "_")
            if name == "optimize" and key == "variants":
                values[key] = _variants(value, params, source)
                continue
            if key not in params:
                raise ConfigError(
                    f"{source}: [{name}] unknown key '{key}' (known: {', '.join(sorted(params))})"
                )
            values[key] = _check_type(f"{source}: [{name}] {key}", value, params[key].kind)
        if values:
            result[name] = values
    return result


def _variants(tables: Any, params: dict[str, Option], source: str) -> dict[str, dict[str, Any]]:
    """`[optimize.variants.NAME]` tables: each holds optimize options that override `[optimize]`'s."""
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ConfigError(f"{source}: [optimize] variants must be tables, such as [optimize.variants.lafite]")
    checked = {}
    for variant, table in tables.items():
        where = f"{source}: [optimize.variants.{variant}]"
        checked[variant] = {}
        for key, value in table.items():
            key = key.replace("-", "_")
            if key not in params or key in ("cache", "variant", "dry_run", "force", "wait", "verify"):
                raise ConfigError(f"{where} unknown key '{key}'")
            checked[variant][key] = _check_type(f"{where} {key}", value, params[key].kind)
    return checked


def render_default_config(commands: dict[str, Callable]) -> str:
    """A commented pipeline.toml holding every stage option at its default (for `pipeline init`)."""
    lines = [
        "# pipeline.toml: the project config. Precedence: defaults < this file < command-line flags.",
        "# `pipeline run` runs embed, retrieve and optimize with these settings, each only where stale.",
        "",
        'cache = "cache"',
    ]
    for name in stage_sections():
        command = commands.get(name)
        if command is None:
            continue
        lines += ["", f"[{name}]"]
        for option in command_options(command):
            if option.name in ("cache", "force", "verify", "repair", "wait"):
                continue
            value = list(option.default or []) if option.kind == "list" else option.default
            lines.append(f"# {option.help}" if option.help else f"# {option.name}")
            lines.append(("# " if value is None else "") + f"{option.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    import json

    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def config_from_section(cls, section: dict[str, Any], **overrides):
    """A stage config from its pipeline.toml section (keys are the CLI option names = config fields)."""
    from dataclasses import fields

    names = {f.name for f in fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in section.items() if k in names}
    values.update(overrides)
    return cls(**values)

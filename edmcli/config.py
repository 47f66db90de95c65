"""YAML configuration files for CLI commands: ``--config FILE.yaml`` plus flags that override it.

A config file is a mapping from option names (as on the command line, without ``--``; dashes or
underscores) to values. It becomes the command's default map, so any flag given on the command
line wins over the file, and the file wins over the built-in defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from edmcli.errors import EchoSynthError


def load_yaml_mapping(path: Path, what: str = "config file") -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping, or raise one clear error naming the file
    as ``what`` (a syntax error: its line and column, not the parser's dump)."""
    if not path.is_file():
        raise EchoSynthError(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise EchoSynthError(f"{what} {path} is not valid YAML ({where}{problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise EchoSynthError(f"{what} {path} must be a mapping of option: value")
    return data


def apply_config(
    ctx: typer.Context, _param: typer.CallbackParam, value: Path | None
) -> Path | None:
    """Eager ``--config`` callback: load the file into the command's default map."""
    if value is None:
        return value
    data = load_yaml_mapping(Path(value))
    known = {p.name: p for p in ctx.command.params if p.name not in (None, "config")}
    defaults: dict[str, Any] = {}
    for key, item in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise typer.BadParameter(
                f"{value} sets unknown option {key!r}; valid: "
                + ", ".join(sorted(n.replace("_", "-") for n in known))
            )
        defaults[name] = item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta["config_file"] = (str(value), set(defaults))
    return value


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="YAML file of option: value; flags on the command line override it.",
        is_eager=True,
        callback=apply_config,
        dir_okay=False,
    ),
]
"""The ``--config FILE.yaml`` option every command takes."""

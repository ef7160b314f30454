"""Helpers every command uses: config loading, errors, JSON output."""
from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click

from governor.config import Config, ConfigError, load_config

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_FAIL) -> NoReturn:
    """Print one clear line on stderr and exit."""
    click.echo(f"governor: {message}", err=True)
    sys.exit(code)


def config_from(ctx: click.Context) -> Config:
    """The config named by --config/GOVERNOR_CONFIG (or defaults); invalid → exit 2."""
    root = ctx.find_root()
    path = (root.obj or {}).get("config_path")
    cached = (root.obj or {}).get("config")
    if cached is not None:
        return cached
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"governor: {problem}", err=True)
        sys.exit(EXIT_USAGE)
    root.ensure_object(dict)["config"] = cfg
    return cfg


def emit_json(obj: Any) -> None:
    """One JSON object per line (JSON Lines), like postqueue -j."""
    click.echo(json.dumps(obj, sort_keys=True, default=str))

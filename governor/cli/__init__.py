"""The ``governor`` command: one click group, one module per command family.

Exit codes (all commands):
  0  success
  1  the operation failed (store unreachable, MTA command failed, ...)
  2  bad usage or bad input (unknown option, invalid argument, invalid config)
"""
from __future__ import annotations

import importlib

import click

from governor import __version__

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="governor")
@click.option(
    "-c", "--config", "config_path", envvar="GOVERNOR_CONFIG", metavar="PATH",
    default=None, show_envvar=True,
    help="Configuration file (default: /etc/yahoo-governor/governor.yaml if present, "
         "else built-in defaults).",
)
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """Shared, Redis-backed rate governor for mail to Yahoo-managed domains.

    Postfix (milter + socketmap feedback) and Exim (${readsocket} hooks) ask one
    Redis store before they send to Yahoo, Yahoo's replies drive cooldowns and
    holds, and these commands show and steer that state.
    """
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path


# Each module registers its commands on ``main`` when imported.
_COMMAND_MODULES = (
    "governor.cli.config_cmds",
    "governor.cli.domain_cmd",
    "governor.cli.sim_cmd",
    "governor.cli.demo_cmd",
    "governor.cli.admin_cmds",
    "governor.cli.release_cmd",
    "governor.cli.report_cmd",
    "governor.cli.exim_cmds",
    "governor.cli.serve_cmd",
    "governor.cli.postfix_cmds",
    "governor.cli.setup_cmd",
)

for _name in _COMMAND_MODULES:
    importlib.import_module(_name)

"""exim-config: the Exim macros and snippets for the configured pool (docs/exim.md)."""
from __future__ import annotations

import click

from governor.cli import main
from governor.cli.common import EXIT_USAGE, config_from, fail
from governor.exim_setup import (
    HELD_ACTIONS,
    EximSetupError,
    include_lines,
    render,
    setup_from_config,
    write_files,
)

_DEBIAN_HINT = """\
Copy the files into /etc/exim4/conf.d/ (same subdirectories), then run
  update-exim4.conf && exim4 -bV && systemctl reload exim4
The governor router runs before Debian's dnslookup router (200_exim4-config_primary)."""


@main.command("exim-config")
@click.option("--split", "layout", flag_value="split", default=True,
              help="Debian split config: conf.d/{main,acl,router,transport,retry} files (default).")
@click.option("--monolithic", "layout", flag_value="monolithic",
              help="One file per config section, for .include in a hand-written exim4.conf.")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Write the files under this directory instead of printing them.")
@click.option("--route-list", default=None, metavar="ROUTE",
              help="Send governed mail by manualroute, e.g. '* smarthost.example::25 byname' "
                   "(default: dnslookup to the recipient's MX).")
@click.option("--when-held", type=click.Choice(HELD_ACTIONS), default=None,
              help="RCPT ACL while no IP may send to Yahoo (default from holds.action: "
                   "hold -> freeze, tempfail -> defer).")
@click.option("--no-rcpt-hook", is_flag=True, help="Do not point Debian's MAIN_ACL_CHECK_RCPT at the governor ACL.")
@click.option("--no-hold-domains", is_flag=True, help="Do not set hold_domains from the governor.")
@click.pass_context
def exim_config(ctx: click.Context, layout: str, output: str | None, route_list: str | None,
                when_held: str | None, no_rcpt_hook: bool, no_hold_domains: bool) -> None:
    """Print or write the Exim snippets for the configured egress pool.

    One smtp transport per egress IP, the governor router, the RCPT ACL,
    hold_domains and Yahoo retry rules, all switched by macros. Each file is
    printed under a "# ==> NAME <==" line unless --output is given.

    \b
    Examples:
      governor exim-config --split --output /etc/exim4/conf.d
      governor exim-config --monolithic --output /etc/exim4/yahoo-governor
    """
    cfg = config_from(ctx)
    overrides: dict[str, object] = {"rcpt_hook": not no_rcpt_hook, "hold_domains": not no_hold_domains}
    if route_list:
        overrides["route_list"] = route_list
    if when_held:
        overrides["held_action"] = when_held
    try:
        files = render(setup_from_config(cfg, **overrides), layout)
    except EximSetupError as exc:
        fail(str(exc), EXIT_USAGE)
    if output is None:
        for name, text in files.items():
            click.echo(f"# ==> {name} <==\n{text}")
        return
    paths = write_files(files, output)
    for path in paths:
        click.echo(f"wrote {path}", err=True)
    if layout == "split":
        click.echo(_DEBIAN_HINT, err=True)
        return
    click.echo("Add to exim4.conf (main first, each right after its 'begin' line, routers before dnslookup):",
               err=True)
    for section, line in include_lines(paths).items():
        click.echo(f"  {('begin ' + section) if section else 'main section, top':<22} {line}", err=True)

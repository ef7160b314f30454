"""``governor domain``: is mail to these domains governed, and why?

Operators use it to check a domain before and after editing ``domains:`` in
governor.yaml; the same :class:`~governor.domains.DomainSet` the milter and the
Exim daemon use answers, so what it prints is what they do.
"""
from __future__ import annotations

import click

from governor.cli import main
from governor.cli.common import EXIT_USAGE, config_from, emit_json, fail
from governor.domains import DomainSet, DomainVerdict, InvalidDomain, normalise_domain


def _name_part(name: str) -> str:
    """An address is accepted too: its domain is what gets checked."""
    if "@" in name:
        return name.strip().strip("<>").rpartition("@")[2]
    return name


def _validated(names: tuple[str, ...]) -> list[str]:
    """Every name normalised, or exit 2 on the first invalid one (nothing printed yet)."""
    out = []
    for name in names:
        try:
            out.append(normalise_domain(_name_part(name)))
        except InvalidDomain as exc:
            fail(str(exc), EXIT_USAGE)
    return out


def _text(v: DomainVerdict) -> str:
    state = "governed" if v.governed else "not governed"
    return f"{v.domain}: {state} — {v.reason}"


@main.command("domain")
@click.argument("names", nargs=-1, required=True, metavar="NAME [NAME...]")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line (JSON Lines).")
@click.pass_context
def domain(ctx: click.Context, names: tuple[str, ...], as_json: bool) -> None:
    """Show whether mail to each domain is governed as Yahoo mail, and why.

    NAME is a domain (case, a trailing dot and Unicode names are normalised) or
    an address. Names match exactly: mail.yahoo.com is not yahoo.com. With DNS
    on (domains.dns), unlisted names are looked up by MX.

    \b
    Examples:
      governor domain yahoo.com att.net example.org
      governor domain --json user@aol.com
    """
    domains = _validated(names)
    domain_set = DomainSet.from_config(config_from(ctx).domains)
    for name in domains:
        verdict = domain_set.verdict(name)
        if as_json:
            emit_json(verdict.as_dict())
        else:
            click.echo(_text(verdict))

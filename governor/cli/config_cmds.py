"""check-config and explain: what the configuration says, and what it would do."""
from __future__ import annotations

import click

from governor.classify import classify
from governor.cli import main
from governor.cli.common import EXIT_USAGE, config_from, emit_json
from governor.config import ConfigError, load_config
from governor.policy import IpState, decide, describe


@main.command("check-config")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.pass_context
def check_config(ctx: click.Context, path: str | None, as_json: bool) -> None:
    """Validate a configuration file.

    PATH defaults to --config, then /etc/yahoo-governor/governor.yaml. Every
    problem is printed as FILE:LINE: KEY.PATH: what is wrong. Exit status is 0
    when the file is valid and 2 when it is not.
    """
    path = path or ctx.find_root().obj.get("config_path")
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        if as_json:
            emit_json({"valid": False, "errors": [str(p) for p in exc.problems]})
        else:
            for problem in exc.problems:
                click.echo(str(problem), err=True)
        ctx.exit(EXIT_USAGE)
    if as_json:
        emit_json({"valid": True, "source": cfg.source, "pool": list(cfg.pool_ips), "mode": cfg.mode})
    else:
        click.echo(f"{cfg.source}: OK ({len(cfg.pool_ips)} egress IPs, mode {cfg.mode}, "
                   f"Redis down: {cfg.redis_down})")


@main.command("explain")
@click.argument("reply")
@click.option("--ip", default=None, help="Egress IP the reply was seen on (default: the one the reply names).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def explain(ctx: click.Context, reply: str, ip: str | None, as_json: bool) -> None:
    """Classify one SMTP reply and show what the governor would do.

    REPLY may be Yahoo's bare text or as Postfix/Exim log it ("host ... said:",
    "SMTP error from remote mail server after ..."). The reaction shown is the
    one the current configuration takes on an IP with a clean record.

    \b
    Example:
      governor explain '421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred'
    """
    cfg = config_from(ctx)
    c = classify(reply)
    target = ip or c.ip or "the IP"
    actions = decide(c, target, None, IpState(), cfg, now=0.0)
    reaction = describe(actions, target)
    if as_json:
        emit_json({
            "code": c.code, "class": c.cls, "scope": c.scope, "permanent": c.permanent,
            "ip": c.ip, "smtp_code": c.smtp_code, "enhanced": c.enhanced, "host": c.host,
            "stage": c.stage, "meaning": c.meaning, "reaction": reaction,
            "actions": [a.__dict__ for a in actions],
        })
        return
    rows = [
        ("code", c.code or "- (not a Yahoo reply)"), ("class", c.cls or "-"), ("scope", c.scope or "-"),
        ("permanent", "yes" if c.permanent else "no"), ("ip", c.ip or "-"),
        ("stage", c.stage or "-"), ("host", c.host or "-"), ("meaning", c.meaning), ("reaction", reaction),
    ]
    for key, value in rows:
        click.echo(f"{key + ':':<11}{value}")

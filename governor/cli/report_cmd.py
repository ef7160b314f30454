"""governor report: draw what happened from status snapshots."""
from __future__ import annotations

import click

from governor.cli import main
from governor.cli.common import EXIT_USAGE, fail


@main.command("report")
@click.option("--png", "png", required=True, type=click.Path(dir_okay=False, writable=True),
              help="Write the picture to this PNG file.")
@click.option("--title", default="yahoo-governor", show_default=True, help="Title of the picture.")
@click.argument("snapshots", type=click.File("r"), default="-")
def report(png: str, title: str, snapshots) -> None:
    """Draw per-IP rate, leases and cooldown/hold bands over time as a PNG.

    SNAPSHOTS (default: standard input) is what `governor status --json --watch`
    prints. For example, record a busy hour, then draw it:

    \b
      governor status --json --watch --interval 5 > snap.jsonl   # Ctrl-C to stop
      governor report --png yahoo.png snap.jsonl
    """
    from governor.report import ReportError, draw_png, read_snapshots

    try:
        series = read_snapshots(snapshots, getattr(snapshots, "name", "<stdin>"))
    except ReportError as exc:
        fail(str(exc), EXIT_USAGE)
    out = draw_png(series, png, title)
    click.echo(f"{out}: {len(series)} egress IPs, {sum(len(s.t) for s in series.values())} samples")

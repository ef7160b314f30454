"""``governor setup postfix|exim add|remove|test``: put the integration into a real MTA config and take it out again.

Like greylistd's ``greylistd-setup-exim4``: ``add`` edits the files in place inside
clearly marked blocks, ``remove`` gives back the original files byte for byte, and
``test`` says whether the integration is there and the MTA accepts it. The text
rules are in :mod:`governor.mta_setup`, the files and MTA tools in
:mod:`governor.mta_apply`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import click

from governor.cli import main
from governor.cli.common import EXIT_FAIL, EXIT_USAGE, config_from, emit_json, fail


class _OneLineGroup(click.Group):
    """A group whose unknown subcommand is one clear line and exit 2 (not click's usage block)."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None,
                                                                          list[str]]:
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            choices = " or ".join(sorted(self.list_commands(ctx)))
            where = " ".join(ctx.command_path.split()[1:])  # "setup" / "setup postfix"
            fail(f"{where}: unknown {self.metavar_word} {name!r} (use {choices})", EXIT_USAGE)
        return super().resolve_command(ctx, args)

    metavar_word = "command"


class _MtaGroup(_OneLineGroup):
    metavar_word = "MTA"


class _ActionGroup(_OneLineGroup):
    metavar_word = "action"


@main.group("setup", cls=_MtaGroup)
def setup_group() -> None:
    """Apply, remove or check the governor integration in a Postfix or Exim config.

    \b
      governor setup postfix add [--config-dir /etc/postfix] [--dry-run] [--reload]
      governor setup postfix remove [--config-dir DIR] [--dry-run] [--reload]
      governor setup postfix test [--config-dir DIR] [--json]
      governor setup exim add|remove|test [--config-dir /etc/exim4] [--config-file FILE]

    add puts the settings of `governor postfix-config` / `governor exim-config`
    into the files, between "# BEGIN yahoo-governor" and "# END yahoo-governor"
    lines (Debian split Exim config: its own conf.d files). A setting that
    already exists is commented out with "#yahoo-governor-saved# " in front.
    The MTA's own tools check the result before anything is written; running
    add again replaces the blocks. remove restores the files byte for byte.
    --dry-run prints a unified diff and changes nothing. The MTA is not reloaded
    unless --reload is given; the reload command is printed instead.

    Exit status 0 on success (test: every check passed), 1 when a change, a
    check or the reload failed, 2 for bad usage: an unknown MTA, a directory
    that is missing or is not the MTA's config, an invalid governor.yaml.
    """


@setup_group.group("postfix", cls=_ActionGroup)
def postfix_group() -> None:
    """Postfix: main.cf and master.cf (add, remove, test).

    main.cf gets the slot transports' rate delays, connection_cache_ttl_limit
    and smtpd_milters (existing milters kept); master.cf gets gov-rewrite, the
    slot transports and a copy of the qmgr entry with -o
    rewrite_service_name=gov-rewrite (the original entry is saved as a
    comment). Validated with postconf -c before writing.
    """


@setup_group.group("exim", cls=_ActionGroup)
def exim_group() -> None:
    """Exim: Debian split or non-split config, or a monolithic file (add, remove, test).

    \b
    Layout, decided like Debian's update-exim4.conf:
      DIR/exim4.conf exists          that file is edited (Debian prefers it)
      conf.d/ and dc_use_split_config='true' (or no update-exim4.conf.conf)
                                     the governor's conf.d files are written
      exim4.conf.template            blocks in the template
      --config-file FILE             blocks in that monolithic file
    In a monolithic file the macros go at the top, the other pieces right after
    their "begin" lines; an acl_smtp_rcpt setting is saved and wrapped by the
    governor's RCPT ACL (Debian's MAIN_ACL_CHECK_RCPT is hooked by a macro).
    The result is checked with exim -C ... -bV (after update-exim4.conf for a
    Debian layout) before anything is written.
    """


# --------------------------------------------------------------------------- options
def _common(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--json", "as_json", is_flag=True,
                        help="Print the result as JSON (test: one JSON object per check).")(func)
    return func


def _changing(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--reload", "do_reload", is_flag=True,
                        help="Reload the MTA after a change (default: only print the command).")(func)
    func = click.option("--dry-run", is_flag=True, help="Print a unified diff of the change; write nothing.")(func)
    return func


def _postfix_opts(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--chroot", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
                        help="Whether smtpd runs chrooted (milter socket relative to queue_directory); "
                             "auto reads master.cf.")(func)
    func = click.option("--config-dir", metavar="DIR", default=None,
                        help="Postfix configuration directory (default: postfix.config_directory, "
                             "/etc/postfix).")(func)
    return func


def _exim_binary(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--exim", "exim_binary", metavar="PATH", default=None,
                        help="Exim binary for the syntax check (default: $GOVERNOR_EXIM, exim4 on PATH, "
                             "/usr/sbin/exim4).")(func)


def _exim_opts(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--config-file", metavar="FILE", default=None,
                        help="A monolithic Exim config to edit instead of detecting the layout of --config-dir.")(func)
    func = click.option("--config-dir", metavar="DIR", default="/etc/exim4", show_default=True,
                        help="Exim configuration directory.")(func)
    return func


# --------------------------------------------------------------------------- output
def _report_changes(mta: str, action: str, changes: Sequence[Any], *, dry_run: bool, as_json: bool,
                    reload_cmd: list[str], do_reload: bool) -> None:
    """Print the diff (dry run) or write, then say how to reload (or reload)."""
    from governor import mta_apply as ma

    changed = [ch for ch in changes if ch.changed]
    diff = "".join(ch.diff() for ch in changed)
    if not dry_run:
        ma.write_changes(changed)
    reloaded = False
    if changed and not dry_run and do_reload:
        try:
            ma.reload(reload_cmd)
        except ma.ApplyError as exc:
            fail(str(exc), EXIT_FAIL)
        reloaded = True
    if as_json:
        emit_json({"mta": mta, "action": action, "dry_run": dry_run, "reloaded": reloaded,
                   "changed": [str(ch.path) for ch in changed], "diff": diff,
                   "reload_command": " ".join(reload_cmd)})
        return
    if dry_run:
        click.echo(diff, nl=False)
        if not changed:
            click.echo(f"{mta}: nothing to change", err=True)
        return
    if not changed:
        click.echo(f"{mta}: nothing to change ({'already set up' if action == 'add' else 'not set up'})")
        return
    for ch in changed:
        verb = "created" if ch.old is None else "removed" if ch.new is None else "changed"
        click.echo(f"{verb} {ch.path}")
    click.echo("reloaded" if reloaded else f"now run: {_shown(reload_cmd)}")


def _shown(argv: list[str]) -> str:
    return argv[2] if argv[:2] == ["sh", "-c"] else " ".join(argv)


def _report_checks(checks: Sequence[Any], as_json: bool) -> None:
    import sys

    for c in checks:
        if as_json:
            emit_json({"check": c.name, "ok": c.ok, "detail": c.detail})
        else:
            click.echo(f"{'ok  ' if c.ok else 'FAIL'}  {c.name}: {c.detail}")
    sys.exit(0 if all(c.ok for c in checks) else EXIT_FAIL)


def _guard(action: Callable[[], None]) -> None:
    from governor import mta_apply as ma

    try:
        action()
    except ma.ApplyError as exc:
        fail(str(exc), exc.code)
    except OSError as exc:
        fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "), EXIT_FAIL)


# --------------------------------------------------------------------------- postfix
def _postfix_target(ctx: click.Context, config_dir: str | None, need_config: bool) -> tuple[Any, Any]:
    from governor import mta_apply as ma

    cfg = config_from(ctx) if need_config else None
    default_dir, command_dir = "/etc/postfix", "/usr/sbin"
    if cfg is not None:
        default_dir, command_dir = cfg.postfix.config_directory, cfg.postfix.command_directory
    return cfg, ma.postfix_target(config_dir or default_dir, command_dir)


@postfix_group.command("add")
@_postfix_opts
@_changing
@_common
@click.pass_context
def postfix_add(ctx: click.Context, config_dir: str | None, chroot: str, dry_run: bool, do_reload: bool,
                as_json: bool) -> None:
    """Put the governor's settings into main.cf and master.cf (again: replaces them).

    Exit status 0 when written (or nothing to change), 1 when postconf rejects
    the result or a file cannot be written, 2 for a bad directory or config.
    """
    from governor import mta_apply as ma

    def go() -> None:
        cfg, target = _postfix_target(ctx, config_dir, True)
        changes = ma.postfix_changes(cfg, target, "add", chroot)
        _report_changes("postfix", "add", changes, dry_run=dry_run, as_json=as_json,
                        reload_cmd=ma.postfix_reload_command(target), do_reload=do_reload)
    _guard(go)


@postfix_group.command("remove")
@click.option("--config-dir", metavar="DIR", default="/etc/postfix", show_default=True,
              help="Postfix configuration directory.")
@_changing
@_common
def postfix_remove(config_dir: str, dry_run: bool, do_reload: bool, as_json: bool) -> None:
    """Take the governor's blocks out of main.cf and master.cf, restoring saved lines.

    The files become byte-identical to what they were before add. Exit status 0
    (also when there was nothing to remove), 1 on a broken marker or a write
    error, 2 for a bad directory.
    """
    from governor import mta_apply as ma

    def go() -> None:
        target = ma.postfix_target(config_dir)
        changes = ma.postfix_changes(None, target, "remove")
        _report_changes("postfix", "remove", changes, dry_run=dry_run, as_json=as_json,
                        reload_cmd=ma.postfix_reload_command(target), do_reload=do_reload)
    _guard(go)


@postfix_group.command("test")
@_postfix_opts
@click.option("--no-postfix-check", is_flag=True, help="Skip `postfix -c DIR check`.")
@_common
@click.pass_context
def postfix_test(ctx: click.Context, config_dir: str | None, chroot: str, no_postfix_check: bool,
                 as_json: bool) -> None:
    """Check the integration: one block each in main.cf and master.cf, postconf -n
    parses without warnings, smtpd_milters has the governor's milter, gov-rewrite has
    the socketmap transport map, qmgr uses gov-rewrite, every slot transport has its
    rate delay and status filter, the blocks match governor.yaml, postfix check.

    One line per check ("ok" or "FAIL"). Exit status 0 when every check passed,
    1 otherwise, 2 for a bad directory or config.
    """
    from governor import mta_apply as ma

    def go() -> None:
        cfg, target = _postfix_target(ctx, config_dir, True)
        _report_checks(ma.postfix_checks(cfg, target, chroot, postfix_check=not no_postfix_check), as_json)
    _guard(go)


# --------------------------------------------------------------------------- exim
@exim_group.command("add")
@_exim_opts
@_exim_binary
@_changing
@_common
@click.pass_context
def exim_add(ctx: click.Context, config_dir: str, config_file: str | None, exim_binary: str | None,
             dry_run: bool, do_reload: bool, as_json: bool) -> None:
    """Put the governor's Exim config in place (again: replaces it).

    Exit status 0 when written (or nothing to change), 1 when exim -bV rejects
    the result or a conf.d file of the same name is not the governor's, 2 for
    a bad directory or config.
    """
    from governor import mta_apply as ma

    def go() -> None:
        cfg = config_from(ctx)
        target = ma.exim_target(config_dir, config_file)
        changes = ma.exim_changes(cfg, target, "add")
        ma.validate_exim(target, ma.find_exim(exim_binary), changes)
        _report_changes("exim", "add", changes, dry_run=dry_run, as_json=as_json,
                        reload_cmd=ma.exim_reload_command(target), do_reload=do_reload)
    _guard(go)


@exim_group.command("remove")
@_exim_opts
@_changing
@_common
def exim_remove(config_dir: str, config_file: str | None, dry_run: bool, do_reload: bool, as_json: bool) -> None:
    """Delete the governor's conf.d files, or take its blocks out of the file.

    The files become byte-identical to what they were before add. Exit status
    0 (also when there was nothing to remove), 1 on a broken marker or a write
    error, 2 for a bad directory.
    """
    from governor import mta_apply as ma

    def go() -> None:
        target = ma.exim_target(config_dir, config_file)
        changes = ma.exim_changes(None, target, "remove")
        _report_changes("exim", "remove", changes, dry_run=dry_run, as_json=as_json,
                        reload_cmd=ma.exim_reload_command(target), do_reload=do_reload)
    _guard(go)


@exim_group.command("test")
@_exim_opts
@_exim_binary
@_common
@click.pass_context
def exim_test(ctx: click.Context, config_dir: str, config_file: str | None, exim_binary: str | None,
              as_json: bool) -> None:
    """Check the integration: the governor's files or blocks are there and match
    governor.yaml, the effective config passes exim -bV, and it defines the
    yahoo_governor router and one transport per egress IP, and acl_smtp_rcpt is
    the governor's wrapper ACL.

    One line per check ("ok" or "FAIL"). Exit status 0 when every check passed,
    1 otherwise, 2 for a bad directory or config.
    """
    from governor import mta_apply as ma

    def go() -> None:
        cfg = config_from(ctx)
        target = ma.exim_target(config_dir, config_file)
        _report_checks(ma.exim_checks(cfg, target, ma.find_exim(exim_binary)), as_json)
    _guard(go)

"""Files and MTA commands behind ``governor setup postfix|exim add|remove|test``.

:mod:`governor.mta_setup` decides *what* the text becomes; this module reads the
config files, asks the MTA's own tools (``postconf -c``, ``update-exim4.conf``,
``exim -C … -bV``) whether the result is valid *before* anything is written,
writes files atomically with their owner and mode kept, and runs the checks of
``test``. The settings themselves come from :mod:`governor.postfix_setup` and
:mod:`governor.exim_setup`, the same code as ``postfix-config``/``exim-config``.

Nothing here reloads an MTA unless asked (:func:`reload`).
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from governor import mta_setup as ms
from governor import postfix_setup as ps
from governor.config import Config

COMMAND_TIMEOUT = 60
#: The Debian split config's conf.d pieces, in the order update-exim4.conf reads sections.
DEBIAN_SECTIONS = ("main", "acl", "router", "transport", "retry", "rewrite", "auth")


class ApplyError(Exception):
    """One line for the CLI; ``code`` 2 = bad input (wrong directory …), 1 = failure."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class FileChange:
    """One file before and after (None = the file does not exist)."""

    path: Path
    old: str | None
    new: str | None

    @property
    def changed(self) -> bool:
        return self.old != self.new

    def diff(self) -> str:
        if not self.changed:
            return ""
        if self.old is None:
            return ms.unified_diff(str(self.path), "", self.new or "").replace(
                f"--- a/{str(self.path).lstrip('/')}", "--- /dev/null", 1)
        if self.new is None:
            return ms.unified_diff(str(self.path), self.old, "").replace(
                f"+++ b/{str(self.path).lstrip('/')}", "+++ /dev/null", 1)
        return ms.unified_diff(str(self.path), self.old, self.new)


@dataclass(frozen=True)
class Check:
    """One line of ``setup … test``."""

    name: str
    ok: bool
    detail: str


# --------------------------------------------------------------------------- files
def read_text(path: Path) -> str:
    """The file's exact bytes as text (undecodable bytes survive a round trip)."""
    return path.read_bytes().decode("utf-8", "surrogateescape")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def write_changes(changes: Sequence[FileChange]) -> list[Path]:
    """Write every changed file: a temp file in the same directory, the old file's
    owner and mode (new files 0644), then rename; ``new=None`` deletes."""
    done = []
    for ch in changes:
        if not ch.changed:
            continue
        if ch.new is None:
            ch.path.unlink(missing_ok=True)
        else:
            _atomic_write(ch.path, _encode(ch.new))
        done.append(ch.path)
    return done


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    st = path.stat() if path.exists() else None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, (st.st_mode & 0o7777) if st else 0o644)
        if st is not None and os.geteuid() == 0:
            os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run an MTA tool; a missing binary or a hang is an ApplyError."""
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ApplyError(f"{shlex.join(argv)}: {exc}") from None


def _first_line(proc: subprocess.CompletedProcess[str]) -> str:
    text = (proc.stderr or proc.stdout or "").strip()
    lines = [ln for ln in text.splitlines() if "purging the environment" not in ln and "keep_environment" not in ln]
    return lines[0] if lines else f"exit status {proc.returncode}"


# --------------------------------------------------------------------------- Postfix
@dataclass(frozen=True)
class PostfixTarget:
    config_dir: Path
    command_directory: str = "/usr/sbin"

    @property
    def main_cf(self) -> Path:
        return self.config_dir / "main.cf"

    @property
    def master_cf(self) -> Path:
        return self.config_dir / "master.cf"

    def postconf(self) -> str:
        found = Path(self.command_directory) / "postconf"
        return str(found) if found.exists() else (shutil.which("postconf") or str(found))


def postfix_target(config_dir: str, command_directory: str = "/usr/sbin") -> PostfixTarget:
    """Validate that ``config_dir`` is a Postfix config directory (bad input → code 2)."""
    path = Path(config_dir)
    if not path.is_dir():
        raise ApplyError(f"{config_dir}: no such directory", 2)
    missing = [n for n in ("main.cf", "master.cf") if not (path / n).is_file()]
    if missing:
        raise ApplyError(f"{config_dir} is not a Postfix config directory (no {' or '.join(missing)})", 2)
    return PostfixTarget(path.resolve(), command_directory)


@contextmanager
def _postfix_copy(target: PostfixTarget, main: str, master: str) -> Iterator[ps.PostfixDir]:
    """A scratch config directory holding ``main``/``master`` for postconf to read."""
    with tempfile.TemporaryDirectory(prefix="gov-setup-") as tmp:
        for name, text in (("main.cf", main), ("master.cf", master)):
            path = Path(tmp) / name
            path.write_bytes(_encode(text))
            # postconf re-reads a file modified within the last 2 s until it is older
            # (a guard against half-written files): backdate the scratch copies.
            old = path.stat().st_mtime - 60
            os.utime(path, (old, old))
        yield ps.PostfixDir(tmp, str(Path(target.postconf()).parent))


def postfix_plan(cfg: Config, target: PostfixTarget, chroot: str = "auto") -> ps.PostfixPlan:
    """The plan for the *original* files (our blocks taken out first), so existing
    milters and transport maps are read from the admin's own settings."""
    main = ms.strip_managed(read_text(target.main_cf))
    master = ms.strip_managed(read_text(target.master_cf))
    try:
        with _postfix_copy(target, main, master) as pdir:
            return ps.plan_for(cfg, pdir, chroot)
    except ps.SetupError as exc:
        raise ApplyError(str(exc), 2 if "pool" in str(exc) or "chroot" in str(exc) else 1) from None


def postfix_texts(plan: ps.PostfixPlan, main: str, master: str) -> tuple[str, str]:
    """main.cf and master.cf text with the plan applied (any earlier block replaced)."""
    amend = {"qmgr/unix": [f"-o {k}={v}" for k, v in plan.qmgr_options.items()]}
    try:
        return (ms.postfix_main_add(main, plan.main),
                ms.postfix_master_add(master, [e.text() for e in plan.master], amend))
    except ms.EditError as exc:
        raise ApplyError(str(exc)) from None


def postfix_changes(cfg: Config | None, target: PostfixTarget, action: str, chroot: str = "auto") -> list[FileChange]:
    """The file changes of ``add`` or ``remove`` (``cfg`` is needed for add only)."""
    main, master = read_text(target.main_cf), read_text(target.master_cf)
    try:
        if action == "remove":
            return [FileChange(target.main_cf, main, ms.strip_managed(main)),
                    FileChange(target.master_cf, master, ms.strip_managed(master))]
    except ms.EditError as exc:
        raise ApplyError(f"{target.config_dir}: {exc}") from None
    assert cfg is not None
    plan = postfix_plan(cfg, target, chroot)
    new_main, new_master = postfix_texts(plan, main, master)
    validate_postfix(target, plan, new_main, new_master)
    return [FileChange(target.main_cf, main, new_main), FileChange(target.master_cf, master, new_master)]


def validate_postfix(target: PostfixTarget, plan: ps.PostfixPlan, main: str, master: str) -> None:
    """postconf must parse the new files and see the plan's values; raises otherwise."""
    with _postfix_copy(target, main, master) as pdir:
        for args in (["-n"], ["-M"]):
            proc = run([target.postconf(), "-c", pdir.config_directory, *args])
            if proc.returncode != 0:
                raise ApplyError(f"postconf rejects the edited files: {_first_line(proc)}")
        for problem in _postfix_mismatches(pdir, plan):
            raise ApplyError(f"postconf does not see the governor's settings: {problem}")


def _postfix_mismatches(pdir: ps.PostfixDir, plan: ps.PostfixPlan) -> list[str]:
    """Differences between what postconf reads and the plan."""
    out = []
    for name, want in plan.main.items():
        got = pdir.get(name)
        if got != want:
            out.append(f"{name} = {got!r}, expected {want!r}")
    params = pdir.master_params()
    for key, value in plan.qmgr_options.items():
        if params.get("qmgr/unix", {}).get(key) != value:
            out.append(f"qmgr/unix -o {key} is not {value}")
    services = set(pdir.master_fields())
    out += [f"master.cf has no {e.key} service" for e in plan.master if e.key not in services]
    return out


def postfix_checks(cfg: Config, target: PostfixTarget, chroot: str = "auto", *,
                   postfix_check: bool = True) -> list[Check]:
    """What ``setup postfix test`` reports, one Check per line."""
    checks: list[Check] = []
    try:
        main, master = read_text(target.main_cf), read_text(target.master_cf)
        blocks = (len(ms.blocks(ms.split_lines(main))), len(ms.blocks(ms.split_lines(master))))
    except ms.EditError as exc:
        return [Check("markers", False, str(exc))]
    checks.append(Check("main.cf block", blocks[0] == 1, f"{blocks[0]} managed block(s) in {target.main_cf}"))
    checks.append(Check("master.cf block", blocks[1] == 1, f"{blocks[1]} managed block(s) in {target.master_cf}"))
    pdir = ps.PostfixDir(str(target.config_dir), str(Path(target.postconf()).parent))
    proc = run([target.postconf(), "-c", str(target.config_dir), "-n"])
    warnings = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    checks.append(Check("postconf -n", proc.returncode == 0 and not warnings,
                        "parses" if proc.returncode == 0 and not warnings else _first_line(proc)))
    if proc.returncode != 0:
        return checks
    try:
        plan = postfix_plan(cfg, target, chroot)
    except ApplyError as exc:
        return checks + [Check("plan", False, str(exc))]
    checks += _postfix_setting_checks(cfg, pdir, plan)
    new_main, new_master = postfix_texts(plan, main, master)
    current = new_main == main and new_master == master
    stale = ("not set up: run `governor setup postfix add`" if blocks == (0, 0) else
             "governor.yaml changed since add: run `governor setup postfix add` again")
    checks.append(Check("up to date", current, "the blocks match governor.yaml" if current else stale))
    if postfix_check:
        checks.append(_postfix_check(target))
    return checks


def _postfix_setting_checks(cfg: Config, pdir: ps.PostfixDir, plan: ps.PostfixPlan) -> list[Check]:
    milter_socket = plan.milter.split(",", 1)[0].lstrip("{ ").strip()
    milters = pdir.get("smtpd_milters")
    transport = ps.socketmap_table(cfg.sockets.socketmap, ps.TRANSPORT_MAP)
    params = pdir.master_params()
    maps = params.get(f"{ps.RESOLVER_SERVICE}/unix", {}).get("transport_maps", "")
    resolver = params.get("qmgr/unix", {}).get("rewrite_service_name", "")
    services = set(pdir.master_fields())
    missing = [s.name for s in plan.slots if f"{s.name}/unix" not in services
               or pdir.get(f"{s.name}_transport_rate_delay") != f"{s.plan.delay}s"
               or not params.get(f"{s.name}/unix", {}).get("smtp_delivery_status_filter", "").startswith(
                   ps.socketmap_table(cfg.sockets.socketmap, ps.STATUS_MAP_PREFIX))]
    return [
        Check("milter", milter_socket in milters, f"smtpd_milters has {milter_socket}" if milter_socket in milters
              else f"smtpd_milters lacks {milter_socket}"),
        Check("transport map", transport in maps, f"{ps.RESOLVER_SERVICE} transport_maps has {transport}"
              if transport in maps else f"{ps.RESOLVER_SERVICE} transport_maps lacks {transport}"),
        Check("qmgr resolver", resolver == ps.RESOLVER_SERVICE, f"qmgr rewrite_service_name = {resolver or '(unset)'}"),
        Check("slot transports", not missing, f"{len(plan.slots)} slots with rate delay and status filter"
              if not missing else f"missing or wrong: {', '.join(missing)}"),
    ]


def _postfix_check(target: PostfixTarget) -> Check:
    postfix = Path(target.command_directory) / "postfix"
    binary = str(postfix) if postfix.exists() else shutil.which("postfix")
    if binary is None:
        return Check("postfix check", True, "skipped: postfix command not found")
    proc = run([binary, "-c", str(target.config_dir), "check"])
    problems = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    ok = proc.returncode == 0 and not problems
    return Check("postfix check", ok, "no problems" if ok else _first_line(proc))


def postfix_reload_command(target: PostfixTarget) -> list[str]:
    if target.config_dir == Path("/etc/postfix"):
        return ["postfix", "reload"]
    return ["postfix", "-c", str(target.config_dir), "reload"]


# --------------------------------------------------------------------------- Exim
@dataclass(frozen=True)
class EximTarget:
    """Where the integration goes: ``split`` (Debian conf.d), ``template`` (Debian's
    exim4.conf.template) or ``file`` (a hand-written monolithic config)."""

    layout: str
    config_dir: Path
    file: Path | None = None

    @property
    def debian(self) -> bool:
        return self.layout in ("split", "template")


def debian_split_setting(config_dir: Path) -> bool | None:
    """``dc_use_split_config`` of update-exim4.conf.conf (None when there is no such file)."""
    conf = config_dir / "update-exim4.conf.conf"
    if not conf.is_file():
        return None
    for line in read_text(conf).splitlines():
        name, _, value = line.strip().partition("=")
        if name.strip() == "dc_use_split_config":
            return value.strip().strip("'\"").lower() == "true"
    return False


def exim_target(config_dir: str, config_file: str | None = None) -> EximTarget:
    """Find out which layout ``config_dir`` uses, the way Debian's tools decide."""
    path = Path(config_dir)
    if config_file is not None:
        file = Path(config_file)
        if not file.is_file():
            raise ApplyError(f"{config_file}: no such file", 2)
        return EximTarget("file", file.resolve().parent, file.resolve())
    if not path.is_dir():
        raise ApplyError(f"{config_dir}: no such directory", 2)
    path = path.resolve()
    if (path / "exim4.conf").is_file():  # Debian uses it instead of the generated config
        return EximTarget("file", path, path / "exim4.conf")
    split = debian_split_setting(path)
    if (path / "conf.d").is_dir() and split is not False:
        return EximTarget("split", path)
    if (path / "exim4.conf.template").is_file():
        return EximTarget("template", path, path / "exim4.conf.template")
    raise ApplyError(f"{config_dir} is not an Exim config directory (no conf.d/, exim4.conf.template "
                     "or exim4.conf; name a monolithic config with --config-file)", 2)


def exim_pieces(cfg: Config, debian_hook: bool) -> dict[str, str]:
    """conf.d name → text for this pool; ``debian_hook``: set the macro that points
    Debian's MAIN_ACL_CHECK_RCPT at the governor's RCPT ACL."""
    from governor import exim_setup as es

    try:
        setup = es.setup_from_config(cfg)
        files = es.conf_d_files(setup, "split" if debian_hook else "monolithic")
    except es.EximSetupError as exc:
        raise ApplyError(str(exc), 2) from None
    first = "main/00_yahoo-governor_macros"
    head, _, rest = files[first].partition("\n")
    files[first] = f"# Generated by `governor setup exim add` from {setup.source}.\n{rest}"
    return files


def exim_changes(cfg: Config | None, target: EximTarget, action: str) -> list[FileChange]:
    """The file changes of ``add`` or ``remove`` (``cfg`` is needed for add only)."""
    if target.layout == "split":
        return _split_changes(cfg, target, action)
    assert target.file is not None
    old = read_text(target.file)
    try:
        if action == "remove":
            return [FileChange(target.file, old, ms.strip_managed(old))]
        assert cfg is not None
        return [FileChange(target.file, old, exim_monolithic_text(cfg, target, old))]
    except ms.EditError as exc:
        raise ApplyError(f"{target.file}: {exc}") from None


def exim_monolithic_text(cfg: Config, target: EximTarget, old: str) -> str:
    from governor.exim_setup import section_of

    # Debian's config routes acl_smtp_rcpt through MAIN_ACL_CHECK_RCPT, which a macro hooks;
    # any other file gets its acl_smtp_rcpt line wrapped.
    debian = "MAIN_ACL_CHECK_RCPT" in ms.strip_managed(old)
    sections: dict[str, str] = {}
    for name, text in exim_pieces(cfg, debian).items():
        sec = section_of(name)
        sections[sec] = sections.get(sec, "") + text
    return ms.exim_add(old, sections, wrap_rcpt_acl=None if debian else "acl_yahoo_governor_check_rcpt")


def _split_changes(cfg: Config | None, target: EximTarget, action: str) -> list[FileChange]:
    """Our conf.d files: written by add, deleted by remove. A file of the same name
    that we did not write is never touched: add refuses, remove leaves it."""
    from governor.exim_setup import PIECE_NAMES

    confd = target.config_dir / "conf.d"
    wanted = exim_pieces(cfg, True) if action == "add" and cfg is not None else {}
    out = []
    for name in PIECE_NAMES:
        path = confd / name
        old = read_text(path) if path.is_file() else None
        if old is not None and not ms.is_our_file(old):
            if action == "add":
                raise ApplyError(f"{path} exists and is not managed by `governor setup exim`; move it away first")
            out.append(FileChange(path, old, old))
            continue
        out.append(FileChange(path, old, ms.conf_d_file(wanted[name]) if action == "add" else None))
    return out


def find_exim(explicit: str | None = None) -> str:
    """The exim binary: --exim, $GOVERNOR_EXIM, exim4/exim on PATH, /usr/sbin/exim4."""
    for cand in (explicit, os.environ.get("GOVERNOR_EXIM"), shutil.which("exim4"), shutil.which("exim"),
                 "/usr/sbin/exim4"):
        if cand and Path(cand).is_file():
            return cand
    raise ApplyError("exim binary not found (use --exim PATH)", 2)


def _update_exim4_conf(exim: str) -> str | None:
    for cand in (Path(exim).parent / "update-exim4.conf", shutil.which("update-exim4.conf"),
                 "/usr/sbin/update-exim4.conf"):
        if cand and Path(cand).is_file():
            return str(cand)
    return None


@contextmanager
def exim_effective_config(target: EximTarget, exim: str, overrides: dict[Path, str] | None = None
                          ) -> Iterator[tuple[Path, str]]:
    """The config Exim would run: the file itself, or what update-exim4.conf builds
    from the directory (conf.d concatenated in order when that tool is missing).

    ``overrides`` replaces file contents (``None`` value = absent) so a change can
    be checked before it is written: the directory is then copied first. Yields
    (path, how it was built).
    """
    with tempfile.TemporaryDirectory(prefix="gov-exim-setup-") as tmp:
        root = target.config_dir
        if target.layout == "file":
            assert target.file is not None
            text = (overrides or {}).get(target.file)
            if text is None:
                yield target.file, "as is"
                return
            edited = Path(tmp) / "exim.conf"
            edited.write_bytes(_encode(text))
            os.chmod(edited, 0o644)
            yield edited, "as is"
            return
        if overrides:
            root = Path(tmp) / "etc"
            shutil.copytree(target.config_dir, root, symlinks=True)
            for path, text in overrides.items():
                dest = root / path.relative_to(target.config_dir)
                if text is None:
                    dest.unlink(missing_ok=True)
                else:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(_encode(text))
        out = Path(tmp) / "exim.conf"
        tool = _update_exim4_conf(exim)
        if tool and (root / "update-exim4.conf.conf").is_file():
            proc = run(["sh", tool, "--confdir", str(root), "--output", str(out)])
            if proc.returncode != 0:
                raise ApplyError(f"update-exim4.conf failed: {_first_line(proc)}")
            how = "built by update-exim4.conf"
        else:
            out.write_bytes(_encode(_concatenate(target, root)))
            how = "conf.d concatenated" if target.layout == "split" else "template as is"
        os.chmod(out, 0o644)
        yield out, how


def _concatenate(target: EximTarget, root: Path) -> str:
    if target.layout == "template":
        return read_text(root / "exim4.conf.template")
    parts = []
    for section in DEBIAN_SECTIONS:
        d = root / "conf.d" / section
        if d.is_dir():
            parts += [read_text(f) for f in sorted(d.iterdir()) if f.is_file() and _run_parts_name(f.name)]
    return "".join(p if p.endswith("\n") else p + "\n" for p in parts)


def _run_parts_name(name: str) -> bool:
    """update-exim4.conf's run-parts rule: letters, digits, '_' and '-' only."""
    return bool(name) and all(c.isalnum() or c in "_-" for c in name)


def exim_syntax(exim: str, config: Path) -> subprocess.CompletedProcess[str]:
    return run([exim, "-C", str(config), "-bV"])


def validate_exim(target: EximTarget, exim: str, changes: Sequence[FileChange]) -> None:
    """``exim -bV`` must accept the config the changes produce; raises otherwise."""
    overrides = {ch.path: ch.new for ch in changes if ch.changed}
    with exim_effective_config(target, exim, overrides) as (config, _):  # type: ignore[arg-type]
        proc = exim_syntax(exim, config)
        if proc.returncode != 0:
            raise ApplyError(f"exim -bV rejects the edited config: {_first_line(proc)}")


def exim_checks(cfg: Config, target: EximTarget, exim: str) -> list[Check]:
    """What ``setup exim test`` reports, one Check per line."""
    checks = [Check("layout", True, _layout_text(target))]
    try:
        wanted = exim_changes(cfg, target, "add")
    except ApplyError as exc:
        return checks + [Check("up to date", False, str(exc))]
    present = _exim_present(target)
    checks.append(present)
    if not present.ok:
        return checks
    stale = [str(ch.path) for ch in wanted if ch.changed]
    checks.append(Check("up to date", not stale, "the integration matches governor.yaml" if not stale else
                        f"{', '.join(stale)} differ from governor.yaml: run `governor setup exim add` again"))
    try:
        with exim_effective_config(target, exim) as (config, how):
            proc = exim_syntax(exim, config)
            checks.append(Check("exim -bV", proc.returncode == 0, f"config parses ({how})"
                                if proc.returncode == 0 else _first_line(proc)))
            if proc.returncode == 0:
                checks += _exim_objects(cfg, exim, config)
    except ApplyError as exc:
        checks.append(Check("exim -bV", False, str(exc)))
    return checks


def _layout_text(target: EximTarget) -> str:
    if target.layout == "split":
        return f"Debian split config in {target.config_dir}/conf.d"
    if target.layout == "template":
        return f"Debian non-split config {target.file}"
    return f"monolithic config {target.file}"


def _exim_present(target: EximTarget) -> Check:
    if target.layout == "split":
        files = _split_changes(None, target, "remove")
        ours = [ch.path for ch in files if ch.old is not None and ms.is_our_file(ch.old)]
        return Check("files", len(ours) == len(files), f"{len(ours)} of {len(files)} governor files in conf.d")
    assert target.file is not None
    try:
        n = len(ms.blocks(ms.split_lines(read_text(target.file))))
    except ms.EditError as exc:
        return Check("blocks", False, str(exc))
    return Check("blocks", n > 0, f"{n} managed block(s) in {target.file}")


def _exim_objects(cfg: Config, exim: str, config: Path) -> list[Check]:
    from governor.transports import exim_transport

    out = []
    rcpt = run([exim, "-C", str(config), "-bP", "acl_smtp_rcpt"]).stdout.partition("=")[2].strip()
    if rcpt:  # without any RCPT ACL there is nothing to hook (Exim refuses every RCPT then)
        hooked = rcpt == "acl_yahoo_governor_check_rcpt"
        out.append(Check("rcpt acl", hooked, f"acl_smtp_rcpt = {rcpt}" + ("" if hooked else
                         " (the governor's RCPT ACL is not hooked; see docs/exim.md)")))
    proc = run([exim, "-C", str(config), "-bP", "router", "yahoo_governor"])
    out.append(Check("router", proc.returncode == 0, "yahoo_governor defined (YAHOO_GOVERNOR_ENABLE is set)"
                     if proc.returncode == 0 else "no router yahoo_governor: is YAHOO_GOVERNOR_ENABLE set?"))
    names = [exim_transport(e.name) for e in cfg.pool if e.enabled]
    missing = [n for n in names if run([exim, "-C", str(config), "-bP", "transport", n]).returncode != 0]
    out.append(Check("transports", not missing, f"{', '.join(names)} defined" if not missing
                     else f"missing: {', '.join(missing)}"))
    return out


def exim_reload_command(target: EximTarget) -> list[str]:
    if target.debian:
        return ["sh", "-c", "update-exim4.conf && systemctl reload exim4"]
    return ["systemctl", "reload", "exim4"]


def reload(argv: Sequence[str]) -> None:
    proc = run(argv)
    if proc.returncode != 0:
        raise ApplyError(f"{shlex.join(argv)} failed: {_first_line(proc)}")

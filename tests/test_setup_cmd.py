"""``governor setup postfix|exim add|remove|test`` on real MTA configs.

Postfix: the private config directory of the lab's PostfixInstance (and a running
instance for --reload), checked with the real postconf/postfix. Exim: the lab's
monolithic config and Debian's own conf.d / exim4.conf.template (from the
exim4-config package that scripts/setup.sh unpacks into .lab/exim-root), built
with update-exim4.conf and checked with ``exim -C … -bV``. Every round trip ends
byte-identical to the original files.
"""
from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from governor.cli import main
from governor.lab.exim import LAB_EXIM, EximConfig, EximInstance, lab_unavailable
from governor.lab.postfix import PostfixInstance

POOL_YAML = """
pool:
  - {ip: 127.0.0.2, name: yahoo-ip1}
  - {ip: 127.0.0.3, name: yahoo-ip2, concurrency: 2}
sockets:
  socketmap: unix:/run/yahoo-governor-test/socketmap.sock
  milter: unix:/run/yahoo-governor-test/milter.sock
  exim: /run/yahoo-governor-test/exim.sock
"""
MILTER = "unix:/run/yahoo-governor-test/milter.sock"
SOCKETMAP = "socketmap:unix:/run/yahoo-governor-test/socketmap.sock:transport"

needs_postfix = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("postconf") is None,
                                   reason="needs root and Postfix (scripts/setup.sh)")
needs_exim = pytest.mark.skipif(lab_unavailable() is not None, reason=lab_unavailable() or "")
DEBIAN_EXIM = LAB_EXIM.parents[2] / "etc" / "exim4"
UPDATE_EXIM4_CONF = LAB_EXIM.parent / "update-exim4.conf"
needs_debian_exim = pytest.mark.skipif(not UPDATE_EXIM4_CONF.exists() or not DEBIAN_EXIM.is_dir(),
                                       reason="exim4-config not unpacked in .lab/exim-root (scripts/setup.sh)")

# What debconf writes for a "local delivery only" install (update-exim4.conf.conf(5)).
UPDATE_EXIM4_CONF_CONF = """\
dc_eximconfig_configtype='local'
dc_other_hostnames='governor.test'
dc_local_interfaces='127.0.0.1 ; ::1'
dc_readhost=''
dc_relay_domains=''
dc_minimaldns='false'
dc_relay_nets=''
dc_smarthost=''
CFILEMODE='644'
dc_use_split_config='{split}'
dc_hide_mailname=''
dc_mailname_in_oh='true'
dc_localdelivery='mail_spool'
"""


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory under /tmp (Postfix and Exim must be able to traverse it)."""
    d = Path(tempfile.mkdtemp(prefix="gov-setup-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def govcfg(workdir: Path) -> Path:
    path = workdir / "governor.yaml"
    path.write_text(POOL_YAML)
    return path


def gov(cfg: Path | None, *args: str) -> tuple[int, str, str]:
    runner = CliRunner()
    res = runner.invoke(main, [*(["-c", str(cfg)] if cfg else []), "setup", *args])
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stdout, res.stderr


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def postconf(config_dir: Path, *args: str) -> str:
    return subprocess.run(["postconf", "-c", str(config_dir), *args], capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip()


# --------------------------------------------------------------------------- Postfix
@pytest.fixture
def postfix_dir(workdir: Path) -> Path:
    """A copy of the e2e lab instance's config directory (its queue_directory stays the lab's)."""
    inst = PostfixInstance(workdir / "pf")
    inst.write_config()
    copy = workdir / "etc-postfix"
    shutil.copytree(inst.config_dir, copy)
    shutil.copytree(copy, workdir / "original")
    return copy


def same_files(a: Path, b: Path) -> bool:
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in ("main.cf", "master.cf"))


@needs_postfix
def test_postfix_add_test_remove_round_trip(govcfg: Path, postfix_dir: Path, workdir: Path) -> None:
    original = workdir / "original"
    code, out, _ = gov(govcfg, "postfix", "add", "--config-dir", str(postfix_dir), "--dry-run")
    assert code == 0 and out.startswith(f"--- a{postfix_dir}/main.cf\n")
    assert "+# BEGIN yahoo-governor" in out and "+  -o rewrite_service_name=gov-rewrite" in out
    assert same_files(postfix_dir, original)  # --dry-run changed nothing

    code, out, _ = gov(govcfg, "postfix", "add", "--config-dir", str(postfix_dir))
    assert code == 0, out
    assert f"now run: postfix -c {postfix_dir} reload" in out
    assert MILTER in postconf(postfix_dir, "-h", "smtpd_milters")
    assert postconf(postfix_dir, "-P", "qmgr/unix/rewrite_service_name") == \
        "qmgr/unix/rewrite_service_name = gov-rewrite"
    assert SOCKETMAP in postconf(postfix_dir, "-P", "gov-rewrite/unix/transport_maps")
    assert postconf(postfix_dir, "-h", "yahoo-ip2-s2_transport_rate_delay") == "2s"
    after_add = snapshot(postfix_dir)

    code, out, _ = gov(govcfg, "postfix", "add", "--config-dir", str(postfix_dir))
    assert code == 0 and "nothing to change" in out
    assert snapshot(postfix_dir) == after_add  # idempotent: still one block
    assert (postfix_dir / "main.cf").read_text().count("# BEGIN yahoo-governor") == 1

    code, out, _ = gov(govcfg, "postfix", "test", "--config-dir", str(postfix_dir))
    assert code == 0, out
    assert all(line.startswith("ok") for line in out.splitlines()) and "postfix check: no problems" in out
    code, out, _ = gov(govcfg, "postfix", "test", "--config-dir", str(postfix_dir), "--json",
                       "--no-postfix-check")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and {r["check"] for r in rows} >= {"milter", "transport map", "qmgr resolver", "up to date"}
    assert all(r["ok"] for r in rows)

    code, out, _ = gov(None, "postfix", "remove", "--config-dir", str(postfix_dir), "--dry-run")
    assert code == 0 and "-# END yahoo-governor" in out
    code, out, _ = gov(None, "postfix", "remove", "--config-dir", str(postfix_dir))
    assert code == 0 and "now run: postfix" in out
    assert same_files(postfix_dir, original)
    code, out, _ = gov(govcfg, "postfix", "test", "--config-dir", str(postfix_dir), "--no-postfix-check")
    assert code == 1 and "FAIL  milter" in out and "not set up" in out


@needs_postfix
def test_postfix_keeps_the_admins_milters_and_maps(govcfg: Path, postfix_dir: Path, workdir: Path) -> None:
    with open(postfix_dir / "main.cf", "a") as fh:
        fh.write("smtpd_milters = inet:127.0.0.1:8891,\n    inet:127.0.0.1:8892\ntransport_maps = hash:/x/transport")
    shutil.copy(postfix_dir / "main.cf", workdir / "original" / "main.cf")
    code, out, _ = gov(govcfg, "postfix", "add", "--config-dir", str(postfix_dir))
    assert code == 0, out
    milters = postconf(postfix_dir, "-h", "smtpd_milters")
    assert milters.startswith("inet:127.0.0.1:8891, inet:127.0.0.1:8892, { " + MILTER)
    assert "#yahoo-governor-saved#     inet:127.0.0.1:8892" in (postfix_dir / "main.cf").read_text()
    assert postconf(postfix_dir, "-P", "gov-rewrite/unix/transport_maps").endswith(
        f"transport_maps = hash:/x/transport,{SOCKETMAP}")
    code, out, _ = gov(govcfg, "postfix", "test", "--config-dir", str(postfix_dir), "--no-postfix-check")
    assert code == 0, out
    code, _, _ = gov(None, "postfix", "remove", "--config-dir", str(postfix_dir))
    assert code == 0 and same_files(postfix_dir, workdir / "original")


@needs_postfix
def test_postfix_takes_over_from_postfix_config_apply(govcfg: Path, postfix_dir: Path, workdir: Path) -> None:
    """A directory configured earlier with `postfix-config --apply` (postconf edits in place)."""
    res = CliRunner().invoke(main, ["-c", str(govcfg), "postfix-config", "--apply", "--config-directory",
                                    str(postfix_dir)])
    assert res.exit_code == 0, res.output
    applied = snapshot(postfix_dir)
    code, out, _ = gov(govcfg, "postfix", "add", "--config-dir", str(postfix_dir))
    assert code == 0, out
    master = (postfix_dir / "master.cf").read_text()
    assert master.count("-o rewrite_service_name=gov-rewrite") == 2  # the saved original and ours
    assert "#yahoo-governor-saved# gov-rewrite" in master
    code, out, _ = gov(govcfg, "postfix", "test", "--config-dir", str(postfix_dir), "--no-postfix-check")
    assert code == 0, out
    code, _, _ = gov(None, "postfix", "remove", "--config-dir", str(postfix_dir))
    assert code == 0 and snapshot(postfix_dir) == applied


@needs_postfix
def test_postfix_reload_on_a_running_instance(govcfg: Path, workdir: Path) -> None:
    with PostfixInstance(workdir / "run") as inst:  # started
        before = snapshot(inst.config_dir)
        code, out, err = gov(govcfg, "postfix", "add", "--config-dir", str(inst.config_dir), "--reload")
        assert code == 0, out + err
        assert out.splitlines()[-1] == "reloaded"
        assert inst.is_running()
        code, out, err = gov(None, "postfix", "remove", "--config-dir", str(inst.config_dir), "--reload")
        assert code == 0 and out.splitlines()[-1] == "reloaded", out + err
        assert snapshot(inst.config_dir) == before


def test_bad_input_is_one_line_and_exit_2(govcfg: Path, workdir: Path) -> None:
    code, _, err = gov(govcfg, "postfix", "add", "--config-dir", str(workdir / "missing"))
    assert code == 2 and err.count("\n") == 1 and "no such directory" in err
    code, _, err = gov(govcfg, "postfix", "test", "--config-dir", str(workdir))
    assert code == 2 and err.count("\n") == 1 and "not a Postfix config directory" in err
    code, _, err = gov(govcfg, "sendmail", "add")
    assert code == 2 and err == "governor: setup: unknown MTA 'sendmail' (use exim or postfix)\n"
    code, _, err = gov(govcfg, "exim", "frob")
    assert code == 2 and err.count("\n") == 1 and "unknown action 'frob'" in err
    code, _, err = gov(govcfg, "exim", "remove", "--config-dir", str(workdir))
    assert code == 2 and err.count("\n") == 1 and "not an Exim config directory" in err


@needs_postfix
def test_postfix_empty_pool_is_bad_input(postfix_dir: Path, workdir: Path) -> None:
    empty = workdir / "empty.yaml"
    empty.write_text("redis_down: fail-open\n")
    code, _, err = gov(empty, "postfix", "add", "--config-dir", str(postfix_dir))
    assert code == 2 and "no enabled egress IP" in err and err.count("\n") == 1
    assert same_files(postfix_dir, workdir / "original")


# --------------------------------------------------------------------------- Exim
@pytest.fixture
def exim_file(workdir: Path) -> Path:
    """The lab's monolithic config, as the e2e Exim instance writes it."""
    inst = EximInstance(workdir / "exim", config_text=EximConfig(sink_port=2525), queue_interval=None, trust=False)
    inst.prepare()
    return inst.config_path


@needs_exim
def test_exim_monolithic_lab_config_round_trip(govcfg: Path, exim_file: Path, workdir: Path) -> None:
    original = exim_file.read_bytes()
    args = ["--config-file", str(exim_file), "--exim", str(LAB_EXIM)]
    code, out, _ = gov(govcfg, "exim", "add", *args, "--dry-run")
    assert code == 0 and "+yahoo_governor:" in out and "+#yahoo-governor-saved# acl_smtp_rcpt = acl_check_rcpt" in out
    assert exim_file.read_bytes() == original
    code, out, _ = gov(govcfg, "exim", "add", *args)
    assert code == 0 and "now run: systemctl reload exim4" in out
    code, out, _ = gov(govcfg, "exim", "test", *args)
    assert code == 0, out
    assert "ok    rcpt acl: acl_smtp_rcpt = acl_yahoo_governor_check_rcpt" in out
    assert "ok    transports: yahoo_ip1, yahoo_ip2 defined" in out
    shown = subprocess.run([str(LAB_EXIM), "-C", str(exim_file), "-bP", "transport", "yahoo_ip2"],
                           capture_output=True, text=True, timeout=60).stdout
    assert "interface = 127.0.0.3" in shown
    code, out, _ = gov(None, "exim", "remove", "--config-file", str(exim_file))
    assert code == 0 and exim_file.read_bytes() == original


def debian_exim_dir(workdir: Path, split: bool) -> Path:
    etc = workdir / "exim4"
    shutil.copytree(DEBIAN_EXIM, etc)
    (etc / "update-exim4.conf.conf").write_text(UPDATE_EXIM4_CONF_CONF.format(split=str(split).lower()))
    return etc


@needs_exim
@needs_debian_exim
@pytest.mark.parametrize("layout", ["split", "template", "exim4.conf"])
def test_exim_debian_config_round_trip(govcfg: Path, workdir: Path, layout: str) -> None:
    etc = debian_exim_dir(workdir, layout == "split")
    if layout == "exim4.conf":  # an admin's own exim4.conf, made from Debian's template
        subprocess.run(["sh", str(UPDATE_EXIM4_CONF), "--confdir", str(etc), "-o", str(etc / "exim4.conf")],
                       check=True, timeout=60)
    before = snapshot(etc)
    args = ["--config-dir", str(etc), "--exim", str(LAB_EXIM)]
    code, out, _ = gov(govcfg, "exim", "add", *args, "--dry-run")
    assert code == 0 and ("+++ b" + str(etc)) in out
    assert snapshot(etc) == before
    code, out, _ = gov(govcfg, "exim", "add", *args)
    reload = "systemctl reload exim4" if layout == "exim4.conf" else "update-exim4.conf && systemctl reload exim4"
    assert code == 0 and f"now run: {reload}\n" in out, out
    if layout == "split":
        assert (etc / "conf.d/router/150_yahoo-governor").is_file()
    else:
        assert set(snapshot(etc)) == set(before)
    code, out, _ = gov(govcfg, "exim", "test", *args)
    assert code == 0, out
    assert ("as is" if layout == "exim4.conf" else "built by update-exim4.conf") in out
    assert "rcpt acl: acl_smtp_rcpt = acl_yahoo_governor_check_rcpt" in out
    code, _, _ = gov(govcfg, "exim", "add", *args)
    assert code == 0
    code, out, _ = gov(None, "exim", "remove", "--config-dir", str(etc))
    assert code == 0
    assert snapshot(etc) == before
    cmp = filecmp.dircmp(etc, DEBIAN_EXIM)
    assert not cmp.diff_files and set(cmp.left_only) <= {"update-exim4.conf.conf", "exim4.conf"}


@needs_exim
@needs_debian_exim
def test_exim_split_refuses_a_file_it_does_not_own(govcfg: Path, workdir: Path) -> None:
    etc = debian_exim_dir(workdir, True)
    (etc / "conf.d/router/150_yahoo-governor").write_text("# the admin's own copy\n")
    before = snapshot(etc)
    code, _, err = gov(govcfg, "exim", "add", "--config-dir", str(etc), "--exim", str(LAB_EXIM))
    assert code == 1 and "is not managed by `governor setup exim`" in err
    assert snapshot(etc) == before
    code, out, _ = gov(None, "exim", "remove", "--config-dir", str(etc))
    assert code == 0 and "nothing to change" in out and snapshot(etc) == before
    code, out, _ = gov(govcfg, "exim", "test", "--config-dir", str(etc), "--exim", str(LAB_EXIM))
    assert code == 1 and "FAIL  up to date:" in out and "is not managed by" in out

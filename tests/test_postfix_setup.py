"""``governor postfix-config``: the generated lines, and --apply through real postconf
on a scratch config directory (no Postfix needs to run)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from governor import postfix_setup as ps
from governor.config import load_config_text
from governor.transports import slot_plan

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """
pool:
  - {ip: 192.0.2.10, name: yahoo-ip1}
  - {ip: 192.0.2.11, name: yahoo-ip2, concurrency: 4, messages_per_minute: 80}
  - {ip: "2001:db8::10", name: yahoo-ip6, concurrency: 2, messages_per_minute: 20}
  - {ip: 192.0.2.12, name: yahoo-off, enabled: false}
limits: {per_ip: {concurrency: 5, messages_per_minute: 300, messages_per_connection: 20}}
sockets: {socketmap: unix:/run/gov/socketmap.sock, milter: unix:/var/spool/postfix/gov/milter.sock}
"""
needs_postconf = pytest.mark.skipif(shutil.which("postconf") is None, reason="postconf not installed")


def cfg_from(text: str = CONFIG, **kw: str):
    extra = "".join(f"{k}: {v}\n" for k, v in kw.items())
    return load_config_text(text + extra, "test.yaml")


def test_socket_specs_for_postfix_and_libmilter() -> None:
    assert ps.socketmap_table("unix:/run/g.sock", "transport") == "socketmap:unix:/run/g.sock:transport"
    assert ps.socketmap_table("/run/g.sock", "status-x") == "socketmap:unix:/run/g.sock:status-x"
    assert ps.socketmap_table("inet:127.0.0.1:2600", "t") == "socketmap:inet:127.0.0.1:2600:t"
    assert ps.pymilter_socket("unix:/run/m.sock") == "unix:/run/m.sock"
    assert ps.pymilter_socket("inet:127.0.0.1:8894") == "inet:8894@127.0.0.1"
    assert ps.pymilter_socket("inet:[::1]:8894") == "inet6:8894@::1"
    assert ps.chroot_relative("/var/spool/postfix/gov/m.sock", "/var/spool/postfix") == "/gov/m.sock"
    assert ps.chroot_relative("/run/m.sock", "/var/spool/postfix") is None


def test_slots_follow_slot_plan_per_ip_and_skip_disabled_ips() -> None:
    cfg = cfg_from()
    plan = ps.build_plan(cfg)
    names = [s.name for s in plan.slots]
    assert names == [f"yahoo-ip1-s{i}" for i in range(1, 6)] + [f"yahoo-ip2-s{i}" for i in range(1, 5)] + \
        ["yahoo-ip6-s1", "yahoo-ip6-s2"]
    assert slot_plan(4, 80) == ps.egress_plan(cfg, cfg.pool[1])
    assert plan.main["yahoo-ip1-s1_transport_rate_delay"] == "1s"
    assert plan.main["yahoo-ip2-s4_transport_rate_delay"] == f"{slot_plan(4, 80).delay}s"
    assert plan.main["yahoo-ip6-s2_transport_rate_delay"] == "6s"
    assert not any("yahoo-off" in k for k in plan.main)


def test_slot_transport_entries() -> None:
    plan = ps.build_plan(cfg_from())
    entries = {e.service: e for e in plan.master}
    e = entries["yahoo-ip2-s3"]
    assert (e.type, e.chroot, e.maxproc, e.command) == ("unix", "n", "1", "smtp")
    opts = dict(e.options)
    assert opts == {
        "syslog_name": "postfix/yahoo-ip2-s3",
        "smtp_bind_address": "192.0.2.11",
        "inet_protocols": "ipv4",
        "smtp_delivery_status_filter": "socketmap:unix:/run/gov/socketmap.sock:status-yahoo-ip2",
        "smtp_connection_cache_destinations": "static:all",
        "smtp_connection_cache_time_limit": "10s",
        "smtp_connection_reuse_count_limit": "19",        # 19 gives 20 messages per connection
    }
    v6 = dict(entries["yahoo-ip6-s1"].options)
    assert v6["smtp_bind_address6"] == "2001:db8::10" and v6["inet_protocols"] == "ipv6"
    assert "smtp_bind_address" not in v6
    assert v6["smtp_connection_cache_time_limit"] == "11s"  # longer than its 6 s rate delay
    assert plan.main["connection_cache_ttl_limit"] == "11s"


def test_only_qmgr_resolves_through_the_governor_map() -> None:
    plan = ps.build_plan(cfg_from(), existing_transport_maps="hash:/etc/postfix/transport")
    assert plan.qmgr_options == {"rewrite_service_name": "gov-rewrite"}
    resolver = next(e for e in plan.master if e.service == "gov-rewrite")
    assert resolver.command == "trivial-rewrite" and resolver.chroot == "n"
    assert dict(resolver.options)["transport_maps"] == \
        "hash:/etc/postfix/transport,socketmap:unix:/run/gov/socketmap.sock:transport"
    assert "transport_maps" not in plan.main           # smtpd and cleanup keep the map-less resolver


@pytest.mark.parametrize("mode,action", [("fail-open", "accept"), ("fail-closed", "tempfail")])
def test_milter_line_follows_redis_down(mode: str, action: str) -> None:
    plan = ps.build_plan(cfg_from(redis_down=mode), existing_milters="inet:127.0.0.1:8891")
    assert plan.main["smtpd_milters"] == (
        "inet:127.0.0.1:8891, { unix:/var/spool/postfix/gov/milter.sock, default_action=" + action
        + ", connect_timeout=5s, command_timeout=5s, content_timeout=15s }")


def test_chrooted_smtpd_gets_the_socket_path_inside_the_chroot() -> None:
    plan = ps.build_plan(cfg_from(), smtpd_chrooted=True)
    assert "{ unix:/gov/milter.sock," in plan.main["smtpd_milters"]
    outside = cfg_from(CONFIG.replace("unix:/var/spool/postfix/gov/milter.sock", "unix:/run/m.sock"))
    with pytest.raises(ps.SetupError, match="chrooted"):
        ps.build_plan(outside, smtpd_chrooted=True)


def test_empty_pool_is_an_error() -> None:
    with pytest.raises(ps.SetupError, match="no enabled egress IP"):
        ps.build_plan(load_config_text("", "empty.yaml"))


def test_merge_list_replaces_our_old_entry_only() -> None:
    old = "{ unix:/a.sock, default_action=accept }, inet:127.0.0.1:8891"
    assert ps.split_postfix_list(old) == ["{ unix:/a.sock, default_action=accept }", "inet:127.0.0.1:8891"]
    assert ps.merge_list(old, "{ unix:/a.sock, x=y }", lambda i: "unix:/a.sock" in i) == \
        "inet:127.0.0.1:8891, { unix:/a.sock, x=y }"


def test_render_is_the_shipped_snippet_for_the_example_config() -> None:
    """milter/postfix.cf.example is generated from milter/governor-postfix.yaml; keep them in sync
    (regenerate: governor -c milter/governor-postfix.yaml postfix-config > milter/postfix.cf.example)."""
    cfg = load_config_text((ROOT / "milter" / "governor-postfix.yaml").read_text(), "example")
    assert ps.render(ps.build_plan(cfg)) == (ROOT / "milter" / "postfix.cf.example").read_text()
    assert not (ROOT / "milter" / "__init__.py").exists()   # must never shadow pymilter's `milter`


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    d = tmp_path / "etc"
    d.mkdir()
    (d / "main.cf").write_text("compatibility_level = 3.6\ntransport_maps = hash:/etc/postfix/transport\n"
                               "smtpd_milters = inet:127.0.0.1:8891\n")
    (d / "master.cf").write_text(
        "smtp      inet  n       -       y       -       -       smtpd\n"
        "qmgr      unix  n       -       n       300     1       qmgr\n"
        "smtp      unix  -       -       y       -       -       smtp\n"
        # a slot of an earlier, bigger pool: removed because it feeds our status map
        "yahoo-ip9-s1 unix - - n - 1 smtp\n  -o smtp_delivery_status_filter="
        "socketmap:unix:/run/gov/socketmap.sock:status-yahoo-ip9\n"
        "custom-s1 unix - - n - 1 smtp\n")
    return d


@needs_postconf
def test_apply_changes_a_config_directory_idempotently(confdir: Path) -> None:
    cfg = cfg_from()
    pdir = ps.PostfixDir(str(confdir))
    plan = ps.plan_for(cfg, pdir)
    assert "{ unix:/gov/milter.sock," in plan.main["smtpd_milters"]      # smtpd is chrooted here
    ps.apply(plan, pdir, cfg)
    master = (confdir / "master.cf").read_text()
    assert "yahoo-ip9-s1" not in master and "custom-s1" in master
    assert pdir.master_params()["qmgr/unix"] == {"rewrite_service_name": "gov-rewrite"}
    assert pdir.get("yahoo-ip2-s1_transport_rate_delay") == f"{slot_plan(4, 80).delay}s"
    assert pdir.master_params()["gov-rewrite/unix"]["transport_maps"] == \
        "hash:/etc/postfix/transport,socketmap:unix:/run/gov/socketmap.sock:transport"
    first = ((confdir / "main.cf").read_text(), master)
    ps.apply(ps.plan_for(cfg, pdir), pdir, cfg)                           # again: nothing changes
    assert ((confdir / "main.cf").read_text(), (confdir / "master.cf").read_text()) == first
    assert pdir.get("smtpd_milters").count("milter.sock") == 1


@needs_postconf
def test_cli_prints_applies_and_reports_errors(confdir: Path, tmp_path: Path) -> None:
    config = tmp_path / "governor.yaml"
    config.write_text(CONFIG)
    base = [sys.executable, "-m", "governor.cli.postfix_cmds", "-c", str(config), "postfix-config"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(base, capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "yahoo-ip1-s1_transport_rate_delay = 1s" in out.stdout
    js = subprocess.run([*base, "--json"], capture_output=True, text=True, env=env)
    assert js.returncode == 0 and '"qmgr_options"' in js.stdout
    dry = subprocess.run([*base, "--apply", "--config-directory", str(confdir), "--dry-run"],
                         capture_output=True, text=True, env=env)
    assert dry.returncode == 0 and "-MX yahoo-ip9-s1/unix" in dry.stdout
    assert "yahoo-ip9-s1" in (confdir / "master.cf").read_text()          # dry run changed nothing
    done = subprocess.run([*base, "--apply", "--config-directory", str(confdir)],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "postfix -c" in done.stdout
    missing = subprocess.run([*base, "--apply", "--config-directory", str(tmp_path / "nope")],
                             capture_output=True, text=True, env=env)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    empty = tmp_path / "empty.yaml"
    empty.write_text("mode: enforce\n")
    bad = subprocess.run([sys.executable, "-m", "governor.cli.postfix_cmds", "-c", str(empty), "postfix-config"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "no enabled egress IP" in bad.stderr

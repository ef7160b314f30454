"""Admin CLI against a real store: tables, --json, actions recorded in the audit, clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from governor.classify import classify
from governor.cli import main
from governor.config import load_config
from governor.store import Store

TS03 = "421 4.7.1 [TS03] All messages from 192.0.2.11 will be permanently deferred; Retrying will NOT succeed."
TSS04 = "421 4.7.0 [TSS04] Messages from 192.0.2.10 temporarily deferred due to unexpected volume or user complaints"


@pytest.fixture
def cfg_path(tmp_path: Path, redis_url: str) -> str:
    path = tmp_path / "governor.yaml"
    path.write_text(f"redis: {{url: '{redis_url}', prefix: t}}\n"
                    "pool:\n  - {ip: 192.0.2.10, name: ip-a}\n  - {ip: 192.0.2.11, name: ip-b}\n")
    return str(path)


@pytest.fixture
def store(cfg_path: str):
    s = Store.connect(load_config(cfg_path))
    yield s
    s.close()


def run(cfg_path: str, *args: str):
    return CliRunner().invoke(main, ["--config", cfg_path, *args], catch_exceptions=False,
                              env={"COLUMNS": "200"})


def test_status_table_and_json(cfg_path: str, store: Store) -> None:
    store.record("192.0.2.10", classify(TSS04), "u@yahoo.com", "yahoo.com")
    store.record("192.0.2.11", classify(TS03), "u@aol.com", "aol.com")
    table = run(cfg_path, "status")
    assert table.exit_code == 0, table.output
    assert "Yahoo: 0/2 egress IPs may send" in table.output
    assert "cooling TSS04" in table.output and "HELD TS03" in table.output
    rows = [json.loads(line) for line in run(cfg_path, "status", "--json").output.splitlines()]
    assert {r["ip"]: r["state"].split()[0] for r in rows} == {"192.0.2.10": "cooling", "192.0.2.11": "HELD"}
    assert rows[1]["level"] == 3 and rows[1]["level_name"] == "blocked"


def test_show_ip(cfg_path: str, store: Store) -> None:
    store.record("192.0.2.11", classify(TS03), "u@aol.com", "aol.com")
    res = run(cfg_path, "show", "ip", "192.0.2.11")
    assert res.exit_code == 0 and "HELD TS03" in res.output and "hold_ip" in res.output
    data = json.loads(run(cfg_path, "show", "ip", "192.0.2.11", "--json").output)
    assert data["status"]["held"] is True and any(e["action"] == "hold_ip" for e in data["audit"])
    missing = run(cfg_path, "show", "ip", "192.0.2.99")
    assert missing.exit_code == 2 and "not in the configured pool" in missing.output


def test_actions_are_audited_with_who_and_why(cfg_path: str, store: Store) -> None:
    assert run(cfg_path, "pause", "192.0.2.10", "--for", "4h", "--reason", "maintenance").exit_code == 0
    st = {s.ip: s for s in store.status()}
    assert st["192.0.2.10"].cooldown_until - st["192.0.2.10"].now == pytest.approx(4 * 3600, abs=5)
    assert run(cfg_path, "resume", "192.0.2.10").exit_code == 0
    assert run(cfg_path, "pause", "provider", "--for", "10m", "--reason", "yahoo incident").exit_code == 0
    assert all(s.provider_paused_until > s.now for s in store.status())
    assert run(cfg_path, "resume", "provider").exit_code == 0
    store.record("192.0.2.11", classify(TS03), "u@aol.com", "aol.com")
    assert run(cfg_path, "release-ip", "192.0.2.11").exit_code == 0
    assert run(cfg_path, "release-ip", "192.0.2.11").exit_code == 1     # not held any more
    assert run(cfg_path, "reset-level", "192.0.2.11").exit_code == 0
    assert {s.ip: s.level for s in store.status()}["192.0.2.11"] == 0
    entries = [json.loads(line) for line in run(cfg_path, "audit", "--json").output.splitlines()]
    actions = [e["action"] for e in entries if e["action"].startswith("admin:")]
    for expected in ("pause", "resume", "provider-pause", "provider-resume", "release-ip", "reset-level"):
        assert f"admin:{expected}" in actions, actions
    assert all("@" in e["who"] for e in entries if e["action"].startswith("admin:"))
    assert any(e["reason"] == "maintenance" for e in entries)
    since = run(cfg_path, "audit", "--since", "1h", "--ip", "192.0.2.11")
    assert since.exit_code == 0 and "release-ip" in since.output


@pytest.mark.parametrize("args, needle", [
    (["pause", "not-an-ip", "--for", "1h", "--reason", "x"], "expected an IP address or \"provider\""),
    (["pause", "192.0.2.10", "--for", "soon", "--reason", "x"], "expected a duration"),
    (["pause", "192.0.2.10", "--reason", "x"], "Missing option '--for'"),
    (["reset-level", "provider"], "expected an IP address"),
    (["audit", "--count", "0"], "0 is not in the range"),
])
def test_bad_arguments_exit_2_with_one_clear_line(cfg_path: str, args: list[str], needle: str) -> None:
    res = run(cfg_path, *args)
    assert res.exit_code == 2 and needle in res.output


def test_unreachable_redis_is_one_line_exit_1(tmp_path: Path) -> None:
    path = tmp_path / "governor.yaml"
    path.write_text(f"redis: {{url: 'unix://{tmp_path}/nothing.sock'}}\npool: [{{ip: 192.0.2.10}}]\n")
    res = CliRunner().invoke(main, ["--config", str(path), "status"])
    assert res.exit_code == 1
    assert res.output.startswith("governor: ") and len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize("shell, marker", [("bash", "complete -o nosort -F"), ("zsh", "compdef"),
                                           ("fish", "complete --no-files --command governor")])
def test_shell_completion_script(shell: str, marker: str) -> None:
    """`eval "$(_GOVERNOR_COMPLETE=bash_source governor)"` (README, governor(8)) works."""
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "governor"
    res = subprocess.run([str(exe)], env={"_GOVERNOR_COMPLETE": f"{shell}_source", "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and marker in res.stdout and "_GOVERNOR_COMPLETE" in res.stdout, res.stdout
    words = subprocess.run([str(exe)], env={"_GOVERNOR_COMPLETE": "bash_complete", "COMP_WORDS": "governor rel",
                                            "COMP_CWORD": "1", "PATH": "/usr/bin:/bin"},
                           capture_output=True, text=True, timeout=60)
    assert "plain,release\n" in words.stdout and "plain,release-ip\n" in words.stdout, words.stdout

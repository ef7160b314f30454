"""Config loading: typed defaults, overrides, and errors that name file:line and the key path."""
from __future__ import annotations

import datetime as dt
import os
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from governor.cli import main
from governor.config import ConfigError, default_config, load_config, load_config_text

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "packaging" / "governor.yaml.example"


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_config_text(textwrap.dedent(text), "governor.yaml")
    return [str(p) for p in exc.value.problems]


def test_defaults_follow_the_sources() -> None:
    cfg = default_config()
    assert cfg.mode == "enforce" and cfg.redis_down == "fail-open"
    assert cfg.limits.concurrency == 5 and cfg.limits.messages_per_connection == 20
    assert cfg.reactions["TSS04"].pause == 2 * 3600
    assert cfg.reactions["TSS05"].pause == 4 * 3600
    assert cfg.reactions["TS01"].pause == 4 * 3600
    assert cfg.reactions["TS03"].hold_ip and cfg.reactions["TS03"].failover
    assert cfg.warmup.initial_per_day == 500 and cfg.warmup.double_every_days == 3


def test_example_config_validates_as_shipped() -> None:
    cfg = load_config(EXAMPLE)
    assert len(cfg.pool) >= 2
    assert any(e.version == 6 for e in cfg.pool)


def test_full_config_is_typed() -> None:
    cfg = load_config_text(textwrap.dedent("""
        mode: monitor
        redis_down: fail-closed
        redis: {url: "redis://127.0.0.1:6390/0", prefix: yg, socket_timeout: 250ms}
        pool:
          - {ip: 192.0.2.10}
          - {ip: "2001:DB8::10", name: yahoo-v6, cold: true, warmup_start: 2026-11-01, concurrency: 3}
        limits: {per_ip: {messages_per_minute: 60, burst: 2, lease_ttl: 2m}}
        domains: {include: [example.org], exclude: [ymail.com], att_family: on,
                  mx_table: {example.net: [mx1.am0.yahoodns.net.]}}
        reactions: {TSS04: {pause: 1h}}
        holds: {action: tempfail, queue_lifetime: 3d}
        sockets: {mode: "0640", socketmap: "inet:127.0.0.1:10027"}
        metrics: {listen: null}
    """), "t.yaml")
    assert cfg.mode == "monitor" and cfg.redis_down == "fail-closed"
    assert cfg.redis.prefix == "yg" and cfg.redis.socket_timeout == 0.25
    assert cfg.pool[0].name == "yahoo-ip1" and cfg.pool[1].ip == "2001:db8::10"
    assert cfg.pool[1].warmup_start == dt.date(2026, 11, 1) and cfg.pool[1].cold
    assert cfg.limits_for("2001:db8::10").concurrency == 3
    assert cfg.limits_for("192.0.2.10").messages_per_minute == 60
    assert cfg.limits.lease_ttl == 120
    assert cfg.domains.mx_table == {"example.net": ("mx1.am0.yahoodns.net",)}
    # field-wise override keeps the bundled fields not given
    assert cfg.reactions["TSS04"].pause == 3600 and cfg.reactions["TSS04"].slow_to == 0.5
    assert cfg.holds.action == "tempfail" and cfg.sockets.mode == 0o640
    assert cfg.metrics.listen is None


def test_time_scale_multiplies_every_duration() -> None:
    cfg = load_config_text("time_scale: 0.001\n")
    assert cfg.reactions["TSS04"].pause == pytest.approx(7.2)
    assert cfg.escalation.max_pause == pytest.approx(86.4)
    assert cfg.limits.lease_ttl == pytest.approx(0.3)


@pytest.mark.parametrize(
    "text, expected",
    [
        # 1. wrong type for a number, the issue's own example
        ("limits:\n  per_ip:\n    messages_per_minute: fast\n",
         'governor.yaml:3: limits.per_ip.messages_per_minute: expected a positive number, got "fast"'),
        # 2. unknown key with a suggestion
        ("limits:\n  per_ip:\n    concurency: 4\n",
         'governor.yaml:3: limits.per_ip.concurency: unknown key (did you mean "concurrency"?)'),
        # 3. unknown top-level section
        ("\nredis_dwn: fail-open\n", 'governor.yaml:2: redis_dwn: unknown key (did you mean "redis_down"?)'),
        # 4. bad enum
        ("mode: strict\n", 'governor.yaml:1: mode: expected one of enforce, monitor, got "strict"'),
        # 5. bad IP literal
        ("pool:\n  - ip: 192.0.2.300\n", 'governor.yaml:2: pool[0].ip: expected an IPv4 or IPv6 address, got "192.0.2.300"'),
        # 6. same IP twice
        ("pool:\n  - ip: 192.0.2.1\n  - ip: 192.0.2.1\n", "governor.yaml:3: pool[1].ip: 192.0.2.1 is listed twice"),
        # 7. bad duration
        ("reactions:\n  TSS04:\n    pause: soon\n",
         'governor.yaml:3: reactions.TSS04.pause: expected a duration such as 30s, 2h or 3d, got "soon"'),
        # 8. out of range
        ("reactions:\n  TSS04: {slow_to: 1.5}\n", "governor.yaml:2: reactions.TSS04.slow_to: expected a positive number"),
        # 9. wrong container type
        ("pool: 192.0.2.1\n", "governor.yaml:1: pool: expected a list"),
        # 10. bad Redis URL
        ("redis:\n  url: localhost:6379\n", "governor.yaml:2: redis.url: expected a Redis URL"),
        # 11. YAML syntax error
        ("limits:\n  per_ip: [1, 2\n", "governor.yaml:3: YAML syntax error"),
        # 12. bad class key
        ("class_reactions:\n  speed: {pause: 1h}\n", "governor.yaml:2: class_reactions.speed: unknown reply class"),
        # 13. boolean expected
        ("domains:\n  dns: maybe\n", 'governor.yaml:2: domains.dns: expected true or false, got "maybe"'),
        # 14. bad warm-up date
        ("pool:\n  - {ip: 192.0.2.1, warmup_start: tomorrow}\n",
         'governor.yaml:2: pool[0].warmup_start: expected a date (YYYY-MM-DD), got "tomorrow"'),
        # 15. bad domain in include
        ("domains:\n  include: [Not A Domain]\n", "governor.yaml:2: domains.include[0]: expected a lowercase domain"),
        # 16. margin longer than lifetime
        ("holds: {queue_lifetime: 1d, release_margin: 2d}\n",
         "governor.yaml:1: holds.release_margin: must be shorter than holds.queue_lifetime"),
        # 17. bad socket mode
        ("sockets: {mode: rw}\n", 'governor.yaml:1: sockets.mode: expected an octal file mode'),
        # 18. negative integer
        ("limits: {per_ip: {burst: -1}}\n", "governor.yaml:1: limits.per_ip.burst: expected a whole number from 0 to 10000, got -1"),
        # 19. the whole file is not a mapping
        ("- just\n- a list\n", "governor.yaml:1: expected a mapping"),
        # 20. headroom is a share of the rate, at most a half
        ("limits:\n  per_ip:\n    postfix_headroom: 5\n",
         "governor.yaml:3: limits.per_ip.postfix_headroom: expected a number from 0 to 0.5, got 5"),
    ],
)
def test_errors_name_file_line_and_path(text: str, expected: str) -> None:
    errors = errors_of(text)
    assert any(e.startswith(expected) for e in errors), errors


def test_all_errors_are_reported_at_once() -> None:
    errors = errors_of("mode: x\nredis_down: y\nlimits: {per_ip: {concurrency: 0}}\n")
    assert [e.split(":")[1] for e in errors] == ["1", "2", "3"]


def test_world_readable_password_file_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "redis.pass"
    secret.write_text("s3cret\n")
    os.chmod(secret, 0o644)
    errors = errors_of(f"redis:\n  password_file: {secret}\n")
    assert any("world-readable" in e and "governor.yaml:2: redis.password_file" in e for e in errors)
    os.chmod(secret, 0o640)
    assert load_config_text(f"redis:\n  password_file: {secret}\n").redis.password_file == str(secret)


def test_check_config_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(main, ["check-config", str(EXAMPLE)])
    assert ok.exit_code == 0, ok.output
    bad = tmp_path / "governor.yaml"
    bad.write_text("limits:\n  per_ip:\n    messages_per_minute: fast\n")
    res = runner.invoke(main, ["check-config", str(bad)])
    assert res.exit_code == 2
    assert f'{bad}:3: limits.per_ip.messages_per_minute: expected a positive number, got "fast"' in res.output
    missing = runner.invoke(main, ["check-config", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "file not found" in missing.output


# ----------------------------------------------------------------------------- redis topologies
def test_sentinel_and_cluster_forms() -> None:
    url = load_config_text("redis: {url: 'redis+sentinel://10.0.0.1:26379,[::1]:26380/mymaster/2'}\n").redis
    assert url.sentinel is not None and url.sentinel.master == "mymaster" and url.sentinel.db == 2
    assert url.sentinel.nodes == (("10.0.0.1", 26379), ("::1", 26380))
    keys = load_config_text("redis:\n  sentinel:\n    master: m1\n    nodes: [10.0.0.1:26379]\n    db: 3\n").redis
    assert keys.sentinel is not None and (keys.sentinel.master, keys.sentinel.db) == ("m1", 3)
    c = load_config_text("redis: {url: 'redis+cluster://10.0.0.1:7000,10.0.0.2:7001'}\n").redis.cluster
    assert c is not None and c.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    c = load_config_text("redis: {cluster: {nodes: ['10.0.0.1:7000']}}\n").redis
    assert c.cluster is not None and c.display == "cluster via 10.0.0.1:7000"


@pytest.mark.parametrize("text, error", [
    ("redis:\n  url: 'redis+sentinel://h:26379'\n", "governor.yaml:2: redis.url: expected redis+sentinel://"),
    ("redis:\n  url: 'redis+sentinel://h:x/m'\n", 'governor.yaml:2: redis.url: expected host:port, got "h:x"'),
    ("redis:\n  url: 'redis+cluster://h:7000/3'\n", "governor.yaml:2: redis.url: Redis Cluster has only database 0"),
    ("redis:\n  url: 'redis+cluster://'\n", "governor.yaml:2: redis.url: expected at least one host:port"),
    ("redis:\n  url: 'memcached://u:pw@h'\n", 'got "memcached://u:***@h"'),
    ("redis:\n  sentinel: {nodes: ['h:1']}\n", "governor.yaml:2: redis.sentinel.master: missing"),
    ("redis:\n  sentinel: {master: m, nodes: []}\n", "governor.yaml:2: redis.sentinel.nodes: expected a list"),
    ("redis:\n  sentinel: {master: m, nodes: ['h']}\n", 'governor.yaml:2: redis.sentinel.nodes[0]: expected host:port'),
    ("redis:\n  sentinel: {master: m, nodes: ['h:1'], db: 99}\n", "governor.yaml:2: redis.sentinel.db"),
    ("redis:\n  cluster: {nodes: ['h:70000']}\n", "governor.yaml:2: redis.cluster.nodes[0]: expected host:port"),
    ("redis:\n  cluster: {nodes: ['h:1']}\n  sentinel: {master: m, nodes: ['h:2']}\n",
     "redis.sentinel and redis.cluster exclude each other"),
    ("redis:\n  tls: {cert_file: /etc/hostname}\n", "governor.yaml:2: redis.tls: cert_file and key_file go together"),
    ("redis:\n  tls: {ca_file: /nonexistent/ca.pem}\n", "governor.yaml:2: redis.tls.ca_file: cannot read"),
    ("redis:\n  username: 'a b'\n", "governor.yaml:2: redis.username: expected an ACL user name"),
])
def test_bad_redis_topologies_name_file_and_line(text: str, error: str) -> None:
    errors = errors_of(text)
    assert any(error in e for e in errors), errors
    assert not any("pw" in e for e in errors)


def test_password_in_url_needs_a_private_config_file(tmp_path: Path) -> None:
    path = tmp_path / "governor.yaml"
    path.write_text("redis:\n  url: 'rediss://gov:hunter2@10.0.0.1:6380/0'\n")
    path.chmod(0o604)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert f"{path}:2: redis.url: the configuration file" in str(exc.value) and "hunter2" not in str(exc.value)
    path.chmod(0o600)
    assert load_config(path).redis.display == "rediss://gov:***@10.0.0.1:6380/0"

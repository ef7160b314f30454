"""Redis AUTH/ACL and TLS with a real redis-server; secrets stay out of files others
can read, out of error messages and out of logs.

- ACL user ``gov`` (``user gov on >pw ~* +@all``) plus ``requirepass`` for the default
  user; the governor logs in with ``redis.username`` + ``redis.password_file``
  (sync Store, the daemon's Lane, the redis.asyncio path).
- TLS: a private CA and server certificate (openssl), ``tls-port``, ``rediss://`` with
  ``redis.tls.ca_file``; a client certificate when the server demands one.
- A password file, a TLS key, or a config file with a password in its URL that is
  readable by everyone is refused, naming the file.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from governor.cli import main
from governor.config import ConfigError, load_config, load_config_text
from governor.daemon import ThreadedDaemon
from governor.lab.redisha import TlsFiles, make_tls_files
from governor.redisproc import RedisProc, free_port
from governor.store import AsyncStore, Store

PASSWORD = "Gov-s3cret-4f9a"       # the ACL user's password: must never show up anywhere
ADMIN_PASSWORD = "adm1n-77c2"      # the default user's requirepass
IP = "192.0.2.10"
POOL = f"pool: [{{ip: {IP}}}]\nlimits: {{per_ip: {{concurrency: 5, messages_per_minute: 60000000}}}}\n"


def _tls_works() -> bool:
    """Debian's redis-server is built with TLS; a build without it refuses --tls-port."""
    r = subprocess.run(["redis-server", "--port", "0", "--save", "", "--tls-port", "1", "--tls-cert-file",
                        "/nonexistent"], capture_output=True, text=True, timeout=10, cwd=tempfile.gettempdir())
    return "Failed to configure TLS" in r.stdout + r.stderr and shutil.which("openssl") is not None


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisProc]:
    args = ["--requirepass", ADMIN_PASSWORD, "--user", "gov", "on", f">{PASSWORD}", "~*", "&*", "+@all"]
    with RedisProc(extra_args=args) as proc:
        yield proc


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "redis.pass"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path


def acl_config(url: str, secret: Path | None, username: str | None = "gov") -> object:
    text = POOL + "redis: {socket_timeout: 2s" + (f", username: {username}" if username else "") + (
        f", password_file: {secret}" if secret else "") + "}\n"
    cfg = load_config_text(text, "security.yaml")
    return dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, url=url))


# --------------------------------------------------------------------------- AUTH / ACL
def test_acl_user_with_password_file(acl_server: RedisProc, secret: Path) -> None:
    for url in (acl_server.tcp_url, acl_server.url):
        with Store.connect(acl_config(url, secret)) as store:
            d = store.acquire(IP)
            assert d.granted and store.release(d.lease)
            assert store.client.acl_whoami() == "gov"

    async def daemon_paths() -> None:
        for pipelined in (True, False):  # the Lane, then redis.asyncio
            store = AsyncStore.connect(acl_config(acl_server.tcp_url, secret), pipelined=pipelined)
            assert (store.lane is not None) == pipelined
            d = await store.acquire(IP)
            assert d.granted and await store.release(d.lease)
            await store.aclose()
    asyncio.run(daemon_paths())


def test_wrong_or_missing_credentials_fail_without_showing_the_password(acl_server: RedisProc,
                                                                        tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pass"
    wrong.write_text("not-" + PASSWORD)
    wrong.chmod(0o600)
    for cfg in (acl_config(acl_server.tcp_url, wrong), acl_config(acl_server.tcp_url, None, None),
                acl_config(f"redis://gov:not-{PASSWORD}@127.0.0.1:{acl_server.port}/0", None, None)):
        with Store.connect(cfg) as store, pytest.raises(redis.RedisError) as err:
            store.acquire(IP)
        assert PASSWORD not in str(err.value) and "not-" not in str(err.value)

        async def lane() -> str:
            store = AsyncStore.connect(cfg)
            try:
                await store.acquire(IP)
            except redis.RedisError as exc:
                return str(exc)
            finally:
                await store.aclose()
            return "granted?"
        text = asyncio.run(lane())
        assert text != "granted?" and PASSWORD not in text


def test_no_secret_in_daemon_logs_or_cli_errors(acl_server: RedisProc, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """A daemon whose password is wrong logs redis-unavailable, never the URL's password;
    the admin CLI's error names the server with the password redacted."""
    url = f"redis://gov:{PASSWORD}x@127.0.0.1:{acl_server.port}/0"
    sockdir = tempfile.mkdtemp(prefix="gs-", dir="/tmp")
    try:
        cfg = load_config_text(POOL + "domains: {dns: false}\n"
                               f"sockets: {{exim: {sockdir}/exim.sock, socketmap: unix:{sockdir}/map.sock}}\n")
        cfg = dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, url=url, socket_timeout=1.0))
        caplog.set_level(logging.DEBUG)
        with ThreadedDaemon(cfg):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(f"{sockdir}/exim.sock")
                s.sendall(b"acquire yahoo.com auto - -\n")
                reply = s.recv(4096).decode()
        assert reply.startswith("OK")  # fail-open: the MTA keeps going
        assert "redis-unavailable" in caplog.text
        assert PASSWORD not in caplog.text
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
    path = tmp_path / "governor.yaml"
    path.write_text(POOL + f"redis: {{url: '{url}'}}\n")
    path.chmod(0o600)
    res = CliRunner().invoke(main, ["--config", str(path), "status"])
    assert res.exit_code == 1, res.output
    assert PASSWORD not in res.output and ":***@127.0.0.1" in res.output


# --------------------------------------------------------------------------- world-readable
def test_world_readable_secrets_are_refused_naming_the_file(tmp_path: Path, secret: Path) -> None:
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match=f"{secret} is world-readable"):
        load_config_text(f"redis: {{password_file: {secret}}}\n", "g.yaml")
    secret.chmod(0o640)
    assert load_config_text(f"redis: {{password_file: {secret}}}\n").redis.password_file == str(secret)

    conf = tmp_path / "governor.yaml"
    conf.write_text(f"redis: {{url: 'redis://gov:{PASSWORD}@127.0.0.1:6379/0'}}\n")
    conf.chmod(0o644)
    with pytest.raises(ConfigError) as err:
        load_config(conf)
    assert f"{conf}:1: redis.url: the configuration file" in str(err.value) and "world-readable" in str(err.value)
    assert PASSWORD not in str(err.value)
    conf.chmod(0o640)
    assert load_config(conf).redis.display == "redis://gov:***@127.0.0.1:6379/0"
    conf.write_text("redis: {url: 'redis://127.0.0.1:6379/0', username: gov}\n")
    conf.chmod(0o644)  # no password in it: readable is fine
    assert load_config(conf).redis.username == "gov"


# --------------------------------------------------------------------------- TLS
@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    if not _tls_works():
        pytest.skip("redis-server is built without TLS (or openssl is missing): rediss:// not testable")
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_server(tls_files: TlsFiles) -> Iterator[tuple[RedisProc, int]]:
    port = free_port()
    with RedisProc(extra_args=tls_files.server_args(port)) as proc:
        yield proc, port


def tls_config(url: str, tls: str) -> object:
    cfg = load_config_text(POOL + f"redis: {{socket_timeout: 2s, connect_timeout: 2s{tls}}}\n", "tls.yaml")
    return dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, url=url))


def test_rediss_with_a_private_ca(tls_server: tuple[RedisProc, int], tls_files: TlsFiles) -> None:
    _, port = tls_server
    for host in ("127.0.0.1", "localhost"):
        cfg = tls_config(f"rediss://{host}:{port}/0", f", tls: {{ca_file: {tls_files.ca}}}")
        with Store.connect(cfg) as store:
            d = store.acquire(IP)
            assert d.granted and store.release(d.lease)

        async def daemon_paths() -> None:
            for pipelined in (True, False):
                store = AsyncStore.connect(cfg, pipelined=pipelined)
                d = await store.acquire(IP)
                assert d.granted and await store.release(d.lease)
                await store.aclose()
        asyncio.run(daemon_paths())


def test_rediss_refuses_a_server_it_cannot_verify(tls_server: tuple[RedisProc, int]) -> None:
    _, port = tls_server
    cfg = tls_config(f"rediss://127.0.0.1:{port}/0", "")  # system CAs: our private CA is unknown
    with Store.connect(cfg) as store, pytest.raises(redis.ConnectionError, match="(?i)certificate"):
        store.acquire(IP)

    async def lane() -> None:
        store = AsyncStore.connect(cfg)
        try:
            with pytest.raises(redis.ConnectionError, match="(?i)certificate"):
                await store.acquire(IP)
        finally:
            await store.aclose()
    asyncio.run(lane())


def test_client_certificate_when_the_server_demands_one(tls_files: TlsFiles, tmp_path: Path) -> None:
    port = free_port()
    with RedisProc(extra_args=tls_files.server_args(port, auth_clients=True)):
        url = f"rediss://127.0.0.1:{port}/0"
        without = tls_config(url, f", tls: {{ca_file: {tls_files.ca}}}")
        with Store.connect(without) as store, pytest.raises(redis.ConnectionError):
            store.acquire(IP)
        with_cert = tls_config(url, f", tls: {{ca_file: {tls_files.ca}, cert_file: {tls_files.client_cert}, "
                                    f"key_file: {tls_files.client_key}}}")
        with Store.connect(with_cert) as store:
            assert store.acquire(IP).granted

        async def lane() -> None:
            store = AsyncStore.connect(with_cert)
            assert (await store.acquire(IP)).granted
            await store.aclose()
        asyncio.run(lane())
    key = tmp_path / "open.key"
    key.write_bytes(Path(tls_files.client_key).read_bytes())
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="world-readable"):
        load_config_text(f"redis: {{tls: {{cert_file: {tls_files.client_cert}, key_file: {key}}}}}\n")
    os.remove(key)


# --------------------------------------------------------------------------- HA modes with AUTH
@pytest.mark.slow
def test_sentinel_and_cluster_with_passwords(tmp_path: Path, secret: Path) -> None:
    """Data nodes with requirepass (redis.password_file), Sentinels with their own
    (redis.sentinel.password_file): the sync and asyncio stores log in to both."""
    from governor.lab.redisha import ClusterLab, SentinelLab

    sentinel_secret = tmp_path / "sentinel.pass"
    sentinel_secret.write_text(ADMIN_PASSWORD + "\n")
    sentinel_secret.chmod(0o600)

    def check(cfg: object) -> None:
        with Store.connect(cfg) as store:
            d = store.acquire(IP)
            assert d.granted and store.release(d.lease)

        async def twin() -> None:
            astore = AsyncStore.connect(cfg)
            d = await astore.acquire(IP)
            assert d.granted and await astore.release(d.lease)
            await astore.aclose()
        asyncio.run(twin())

    with SentinelLab(password=PASSWORD, sentinel_password=ADMIN_PASSWORD) as lab:
        nodes = ", ".join(f"'127.0.0.1:{w.port}'" for w in lab.watchers)
        check(load_config_text(POOL + f"redis:\n  password_file: {secret}\n  socket_timeout: 2s\n"
                               f"  sentinel: {{master: mymaster, nodes: [{nodes}], password_file: {sentinel_secret}}}\n"))
        wrong = load_config_text(POOL + f"redis:\n  socket_timeout: 2s\n  sentinel: {{master: mymaster, nodes: [{nodes}]}}\n")
        with Store.connect(wrong) as store, pytest.raises(redis.RedisError) as err:
            store.acquire(IP)
        assert PASSWORD not in str(err.value)
    with ClusterLab(masters=3, replicas=0, password=PASSWORD) as lab:
        nodes = ", ".join(f"'127.0.0.1:{p}'" for p in lab.ports)
        check(load_config_text(POOL + f"redis:\n  password_file: {secret}\n  socket_timeout: 2s\n"
                               f"  cluster: {{nodes: [{nodes}]}}\n"))

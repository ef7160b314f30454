"""Throwaway Redis high-availability labs on loopback: a Cluster, a Sentinel group, TLS files.

The store's Sentinel and Cluster support is tested (tests/test_store_ha.py) and
benchmarked (bench/scale.py) against real redis-server processes, not mocks. This
module starts them, waits until they are really ready (slots covered, replicas in
sync, Sentinels agreeing), forces failovers the way an operator would, and stops
everything again. Each node is a :class:`~governor.redisproc.RedisProc` (private
scratch directory, unix socket for readiness checks, loopback TCP port).

- :class:`ClusterLab`: N masters + N x replicas, created with ``redis-cli --cluster
  create``; :meth:`ClusterLab.failover` runs ``CLUSTER FAILOVER`` on the replica
  of the master that owns a key's slot, :meth:`ClusterLab.crash` kills that master.
- :class:`SentinelLab`: a primary, a replica and three Sentinels (quorum 2);
  :meth:`SentinelLab.failover` runs ``SENTINEL FAILOVER``;
  :meth:`SentinelLab.crash_with_lag` kills the primary after its replica fell behind.
- :func:`make_tls_files`: a private CA and a server and client certificate for
  127.0.0.1/localhost, made with the openssl command.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from governor.redisproc import RedisProc, RedisProcError, free_port, terminate

MASTER = "mymaster"


def _wait(what: str, check: Any, timeout: float, step: float = 0.1) -> Any:
    """Poll ``check()`` until it returns something truthy; RedisProcError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (redis.RedisError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(step)
    raise RedisProcError(f"{what}: not reached within {timeout}s (last: {last!r})")


def cluster_port(tries: int = 200) -> int:
    """A free loopback port P with P + 10000 free too (the cluster bus), P <= 55535."""
    for _ in range(tries):
        port = random.randint(20000, 45000)
        try:
            for p in (port, port + 10000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RedisProcError("no free port pair for a cluster node")


def _auth_args(password: str | None) -> list[str]:
    """redis-server arguments for a password-protected node that replicates with it."""
    return ["--requirepass", password, "--masterauth", password] if password else []


def _client(port: int, **kw: Any) -> redis.Redis:
    return redis.Redis("127.0.0.1", port, decode_responses=True, socket_timeout=2.0, **kw)


# --------------------------------------------------------------------------- Cluster
@dataclass
class ClusterLab:
    """A Redis Cluster on loopback: ``masters`` primaries, ``replicas`` replicas each."""

    masters: int = 3
    replicas: int = 1
    node_timeout_ms: int = 2000
    password: str | None = None   # requirepass + masterauth on every node
    workdir: Path | None = None
    nodes: list[RedisProc] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory | None = None

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes if n.port is not None]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self, timeout: float = 60.0) -> ClusterLab:
        if shutil.which("redis-cli") is None:
            raise RedisProcError("redis-cli not found on PATH (package redis-tools)")
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="gov-cluster-")
            self.workdir = Path(self._tmp.name)
        try:
            for i in range(self.masters * (1 + self.replicas)):
                wd = self.workdir / f"n{i}"
                node = RedisProc(workdir=wd, port=cluster_port(), extra_args=[
                    "--cluster-enabled", "yes", "--cluster-config-file", str(wd / "nodes.conf"),
                    "--cluster-node-timeout", str(self.node_timeout_ms), *_auth_args(self.password)])
                self.nodes.append(node.start())
            create = ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                      "--cluster-replicas", str(self.replicas), "--cluster-yes"]
            if self.password:
                create += ["-a", self.password, "--no-auth-warning"]
            r = subprocess.run(create, capture_output=True, text=True, timeout=timeout)
            if r.returncode != 0:
                raise RedisProcError(f"redis-cli --cluster create failed: {(r.stdout + r.stderr)[-2000:]}")
            self.wait_healthy(timeout)
        except BaseException:
            self.cleanup()
            raise
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every node says cluster_state:ok and every replica's link to its master is up."""
        def ok() -> bool:
            for port in self.ports:
                c = _client(port, password=self.password)
                try:
                    if c.cluster("INFO").get("cluster_state") != "ok":
                        return False
                    info = c.info("replication")
                    if info.get("role") == "slave" and info.get("master_link_status") != "up":
                        return False
                finally:
                    c.close()
            return True
        _wait("cluster healthy", ok, timeout)

    def master_of(self, key: str) -> int:
        """TCP port of the primary that owns ``key``'s slot now."""
        c = _client(self.ports[0], password=self.password)
        try:
            slot = c.cluster("KEYSLOT", key)
            for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= int(slot) <= int(end):
                    return int(master[1])
        finally:
            c.close()
        raise RedisProcError(f"no node serves the slot of {key!r}")

    def replica_of(self, master_port: int) -> int:
        for port in self.ports:
            c = _client(port, password=self.password)
            try:
                info = c.info("replication")
            finally:
                c.close()
            if info.get("role") == "slave" and int(info.get("master_port", 0)) == master_port:
                return port
        raise RedisProcError(f"no replica of 127.0.0.1:{master_port}")

    def failover(self, key: str, mode: str = "", timeout: float = 30.0) -> tuple[int, int]:
        """``CLUSTER FAILOVER [FORCE|TAKEOVER]`` on the replica of ``key``'s primary; returns
        (old primary port, new primary port) once the replica serves the slot."""
        old = self.master_of(key)
        new = self.replica_of(old)
        c = _client(new, password=self.password)
        try:
            c.execute_command("CLUSTER", "FAILOVER", *([mode] if mode else []))
        finally:
            c.close()
        _wait(f"127.0.0.1:{new} serving {key!r}", lambda: self.master_of(key) == new, timeout)
        self.wait_healthy(timeout)
        return old, new

    def crash(self, key: str, timeout: float = 60.0) -> tuple[int, int]:
        """SIGKILL the primary of ``key``'s slot; its replica takes over once the other
        masters have missed it for ``node_timeout_ms``. Returns (old port, new port) once
        the new primary serves the slot. The killed node stays down."""
        old = self.master_of(key)
        new = self.replica_of(old)
        next(n for n in self.nodes if n.port == old).kill()
        live = [p for p in self.ports if p != old]

        def served() -> bool:
            c = _client(live[0], password=self.password)
            try:
                slot = c.cluster("KEYSLOT", key)
                for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                    if int(start) <= int(slot) <= int(end):
                        return int(master[1]) == new
            finally:
                c.close()
            return False
        _wait(f"127.0.0.1:{new} serving {key!r} after a crash", served, timeout)
        return old, new

    def cleanup(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> ClusterLab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


# --------------------------------------------------------------------------- Sentinel
@dataclass
class SentinelProc:
    """One redis-server in Sentinel mode (it rewrites its config file, so it gets its own)."""

    workdir: Path
    master_port: int
    quorum: int = 2
    down_after_ms: int = 1000
    master_password: str | None = None     # the data nodes' requirepass (sentinel auth-pass)
    password: str | None = None            # this Sentinel's own requirepass
    port: int | None = None
    proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> SentinelProc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        conf = self.workdir / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndaemonize no\ndir {self.workdir}\n"
            f"logfile {self.workdir / 'sentinel.log'}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {self.master_port} {self.quorum}\n"
            f"sentinel down-after-milliseconds {MASTER} {self.down_after_ms}\n"
            f"sentinel failover-timeout {MASTER} 10000\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
            + (f"sentinel auth-pass {MASTER} {self.master_password}\n" if self.master_password else "")
            + (f"requirepass {self.password}\nsentinel sentinel-pass {self.password}\n" if self.password else ""))
        self.proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", str(conf), "--sentinel"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(f"sentinel on {self.port}", self.ping, timeout, 0.05)
        return self

    def ping(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RedisProcError(f"sentinel exited with {self.proc.returncode}")
        c = _client(self.port, password=self.password)
        try:
            return bool(c.ping())
        finally:
            c.close()

    def client(self) -> redis.Redis:
        return _client(self.port, password=self.password)

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None


@dataclass
class SentinelLab:
    """A primary, ``replicas`` replicas and ``sentinels`` Sentinels watching ``mymaster``."""

    replicas: int = 1
    sentinels: int = 3
    quorum: int = 2
    down_after_ms: int = 1000
    password: str | None = None            # requirepass + masterauth of the primary and replicas
    sentinel_password: str | None = None   # requirepass of the Sentinels
    workdir: Path | None = None
    servers: list[RedisProc] = field(default_factory=list)
    watchers: list[SentinelProc] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        nodes = ",".join(f"127.0.0.1:{s.port}" for s in self.watchers)
        return f"redis+sentinel://{nodes}/{MASTER}/0"

    def start(self, timeout: float = 60.0) -> SentinelLab:
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="gov-sentinel-")
            self.workdir = Path(self._tmp.name)
        try:
            primary = RedisProc(workdir=self.workdir / "r0", extra_args=_auth_args(self.password)).start()
            self.servers.append(primary)
            for i in range(self.replicas):
                self.servers.append(RedisProc(workdir=self.workdir / f"r{i + 1}", extra_args=[
                    "--replicaof", "127.0.0.1", str(primary.port), *_auth_args(self.password)]).start())
            for i in range(self.sentinels):
                self.watchers.append(SentinelProc(self.workdir / f"s{i}", primary.port, self.quorum,
                                                  self.down_after_ms, self.password,
                                                  self.sentinel_password).start())
            self.wait_ready(timeout)
        except BaseException:
            self.cleanup()
            raise
        return self

    def master_port(self) -> int:
        c = self.watchers[0].client()
        try:
            return int(c.sentinel_get_master_addr_by_name(MASTER)[1])
        finally:
            c.close()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Every Sentinel knows the master, every replica (in sync) and the other Sentinels."""
        def ready() -> bool:
            master = self.master_port()
            for w in self.watchers:
                c = w.client()
                try:
                    if int(c.sentinel_get_master_addr_by_name(MASTER)[1]) != master:
                        return False
                    replicas = c.execute_command("SENTINEL", "REPLICAS", MASTER)
                    good = [r for r in replicas if "s_down" not in _pairs(r).get("flags", "")
                            and _pairs(r).get("master-link-status") == "ok"]
                    if len(good) < self.replicas:
                        return False
                    if len(c.execute_command("SENTINEL", "SENTINELS", MASTER)) < self.sentinels - 1:
                        return False
                finally:
                    c.close()
            m = _client(master, password=self.password)
            try:
                return m.info("replication").get("role") == "master"
            finally:
                m.close()
        _wait("sentinels ready", ready, timeout, 0.2)

    def failover(self, timeout: float = 60.0) -> tuple[int, int]:
        """``SENTINEL FAILOVER mymaster``; returns (old master port, new master port) once the
        new master accepts writes and the old one replicates from it."""
        old = self.master_port()
        c = self.watchers[0].client()
        try:
            c.execute_command("SENTINEL", "FAILOVER", MASTER)
        finally:
            c.close()

        def moved() -> int:
            new = self.master_port()
            if new == old:
                return 0
            m = _client(new, password=self.password)
            try:
                return new if m.info("replication").get("role") == "master" else 0
            finally:
                m.close()
        new = _wait("sentinel failover", moved, timeout, 0.05)
        return old, new

    def crash_with_lag(self, lag: float, timeout: float = 60.0,
                       during: Callable[[], None] | None = None) -> tuple[int, int]:
        """The worst case of asynchronous replication: the replica stops receiving (it is
        SIGSTOPped and the primary drops its link) while the primary keeps acknowledging
        writes for ``lag`` seconds; then the primary is SIGKILLed and the replica resumes.
        Sentinel promotes the replica after ``down_after_ms``; the writes of the lag are
        lost. ``during`` runs (after the lag) while the replica is cut off: its writes are
        lost too. Returns (old master port, new master port) once the new master takes writes.
        The old primary stays down (this lab then has no replica)."""
        old = self.master_port()
        primary = next(s for s in self.servers if s.port == old)
        replica = next(s for s in self.servers if s.port != old and s.proc is not None)
        assert replica.proc is not None
        os.kill(replica.proc.pid, signal.SIGSTOP)
        try:
            c = _client(old, password=self.password)
            try:
                c.client_kill_filter(_type="replica")
            finally:
                c.close()
            time.sleep(lag)
            if during is not None:
                during()
            primary.kill()
        finally:
            os.kill(replica.proc.pid, signal.SIGCONT)

        def moved() -> int:
            new = self.master_port()
            if new == old:
                return 0
            m = _client(new, password=self.password)
            try:
                return new if m.info("replication").get("role") == "master" else 0
            finally:
                m.close()
        return old, _wait("sentinel failover after a crash", moved, timeout, 0.05)

    def cleanup(self) -> None:
        for w in self.watchers:
            w.stop()
        for s in self.servers:
            s.stop()
        self.watchers.clear()
        self.servers.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> SentinelLab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def _pairs(flat: Any) -> dict[str, str]:
    """SENTINEL REPLICAS rows come as flat [k, v, k, v, ...] lists (or dicts with RESP3)."""
    if isinstance(flat, dict):
        return {str(k): str(v) for k, v in flat.items()}
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


# --------------------------------------------------------------------------- TLS
@dataclass(frozen=True)
class TlsFiles:
    """PEM files: a CA, a server certificate for 127.0.0.1/localhost, a client certificate."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path

    def server_args(self, port: int, *, auth_clients: bool = False) -> list[str]:
        """redis-server arguments for a TLS listener on ``port``."""
        return ["--tls-port", str(port), "--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key),
                "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "yes" if auth_clients else "no"]


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RedisProcError(f"openssl {args[0]} failed: {r.stderr[-1000:]}")


def make_tls_files(directory: Path, days: int = 2) -> TlsFiles:
    """A throwaway CA and two certificates it signed (server: SAN IP:127.0.0.1, DNS:localhost)."""
    if shutil.which("openssl") is None:
        raise RedisProcError("openssl not found on PATH")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", str(days), "-subj", "/CN=governor test CA", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, cn in (("server", "localhost"), ("client", "governor")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={cn}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", str(days), "-extfile", "san.ext", cwd=d)
    for key in d.glob("*.key"):
        key.chmod(0o600)
    return TlsFiles(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")

"""The private Exim lab instance (governor/lab/exim.py) against a loopback sink.

The e2e tests need root, the extracted Exim binary and the Debian-exim user
(scripts/setup.sh provides all three); they are skipped otherwise.
"""
from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from governor.lab.exim import (
    INTERFACE_FROM_ADDRESS_DATA,
    TRUSTED_CONFIGS,
    EximConfig,
    EximError,
    EximInstance,
    lab_unavailable,
    governor_router,
    parse_bp,
    parse_retry_dump,
    processes_using,
)
from governor.lab.sink import SmtpSink


needs_exim = pytest.mark.skipif(lab_unavailable() is not None, reason=lab_unavailable() or "")

#: A router that pins every remote address to 127.0.0.3, the way a governor reply would.
STATIC_LEASE_ROUTER = """pin_ip:
driver = redirect
domains = ! +local_domains
address_data = ip=127.0.0.3 lease=static
data =
"""


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as s:
        yield s


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A work directory Debian-exim can reach (pytest's tmp_path sits under a 0700 dir)."""
    d = Path(tempfile.mkdtemp(prefix="gov-exim-t-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


class TinyGovernor:
    """AF_UNIX line server standing in for the governor: one line in, one reply, close."""

    def __init__(self, path: Path, answer: Callable[[str], str]) -> None:
        self.path = path
        self.answer = answer
        self.requests: list[tuple[int, str]] = []  # (peer uid, line)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def __enter__(self) -> "TinyGovernor":
        self._sock.bind(str(self.path))
        os.chmod(self.path, 0o666)  # Exim's transport side runs as Debian-exim
        self._sock.listen(32)
        threading.Thread(target=self._loop, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()
        self.path.unlink(missing_ok=True)

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                data = b""
                try:
                    while b"\n" not in data:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                except OSError:
                    pass
                line = data.decode().strip()
                uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
                self.requests.append((uid, line))
                conn.sendall(self.answer(line).encode())


# ---------------------------------------------------------------------------
# parsers (no Exim needed)


BP_SAMPLE = """\
 0m   427 1xVYQu-0003WD-2A <sender@exim-lab.test>
          u1@yahoo.com
        D v3@yahoo.com

 3m   431 1xVYR0-0003Y8-2S <> *** frozen ***
          u2@yahoo.com

"""


def test_parse_bp() -> None:
    msgs = parse_bp(BP_SAMPLE)
    assert [m.id for m in msgs] == ["1xVYQu-0003WD-2A", "1xVYR0-0003Y8-2S"]
    assert msgs[0].recipients == ["u1@yahoo.com"] and msgs[0].delivered == ["v3@yahoo.com"]
    assert not msgs[0].frozen and msgs[1].frozen and msgs[1].sender == ""


DUMP_SAMPLE = """\
  R:yahoo.com -1 0 governor: DEFER retry=5 reason=cooldown
23-Nov-2026 18:07:29  23-Nov-2026 18:07:29  23-Nov-2026 18:07:59 
  T:127.0.0.1:127.0.0.1:55009/127.0.0.3 0 65 H=127.0.0.1 [127.0.0.1]: SMTP error from remote mail server after initial connection: 421 4.7.0 [TSS04]
23-Nov-2026 18:07:23  23-Nov-2026 18:07:23  23-Nov-2026 18:07:53 *
"""


def test_parse_retry_dump() -> None:
    recs = parse_retry_dump(DUMP_SAMPLE)
    assert [r.key for r in recs] == ["R:yahoo.com", "T:127.0.0.1:127.0.0.1:55009/127.0.0.3"]
    assert recs[0].errno == -1 and recs[0].text.startswith("governor: DEFER")
    assert recs[0].next_try == "23-Nov-2026 18:07:59" and not recs[0].expired
    assert recs[1].more_errno == 65 and recs[1].expired


# ---------------------------------------------------------------------------
# a real Exim


@pytest.mark.e2e
@needs_exim
def test_delivers_20_messages_from_expanded_interface(sink: SmtpSink) -> None:
    cfg = EximConfig(sink_port=sink.port, interface=INTERFACE_FROM_ADDRESS_DATA,
                     routers_before=STATIC_LEASE_ROUTER)
    with EximInstance(config_text=cfg) as ex:
        ids = ex.inject(20, to=lambda i: f"user{i}@yahoo.com", connections=4)
        assert len(set(ids)) == 20
        msgs = sink.wait_messages(20, timeout=30)
        ex.wait_empty(timeout=15)
        assert {m.peer for m in msgs} == {"127.0.0.3"}
        delivered = ex.wait_for_log(r"=> user\d+@yahoo\.com .*I=\[127\.0\.0\.3\]", count=20)
        assert len(delivered) == 20


@pytest.mark.e2e
@needs_exim
def test_governor_socket_picks_ip_and_defers(sink: SmtpSink, workdir: Path) -> None:
    def answer(line: str) -> str:
        if " held " in f"{line} ":
            return "DEFER retry=5 reason=cooldown"
        return "OK ip=127.0.0.3 lease=L1"

    with TinyGovernor(workdir / "gov.sock", answer) as gov:
        cfg = EximConfig(sink_port=sink.port, interface=INTERFACE_FROM_ADDRESS_DATA,
                         routers_before=governor_router(workdir / "gov.sock"))
        with EximInstance(workdir / "exim", config_text=cfg, queue_interval=None) as ex:
            ok_id, held_id = ex.inject(2, to=lambda i: ["ok@yahoo.com", "held@yahoo.com"][i], connections=1)
            assert sink.wait_messages(1, timeout=15)[0].peer == "127.0.0.3"
            ex.wait_for_log(rf"{held_id} == held@yahoo\.com R=gov_acquire defer \(-1\).*: governor: DEFER")
            left = ex.queue()
            assert [(m.id, m.recipients) for m in left] == [(held_id, ["held@yahoo.com"])]
        # Routing ran as root: the trusted_configs entry kept Exim's privilege.
        assert {uid for uid, line in gov.requests if line.startswith("acquire")} == {0}


@pytest.mark.e2e
@needs_exim
def test_freeze_thaw_deliver_roundtrip(sink: SmtpSink) -> None:
    cfg = EximConfig(sink_port=sink.port)
    with EximInstance(config_text=cfg, queue_interval=None) as ex:
        mid = ex.submit("frozen@yahoo.com")  # -odq: queued, not delivered
        assert [(m.id, m.frozen) for m in ex.queue()] == [(mid, False)]
        ex.freeze([mid])
        assert ex.queue()[0].frozen
        ex.thaw([mid])
        assert not ex.queue()[0].frozen
        assert sink.messages == []
        ex.deliver([mid])
        assert sink.wait_messages(1, timeout=10)[0].rcpts == ["frozen@yahoo.com"]
        assert ex.queue_count() == 0


@pytest.mark.e2e
@needs_exim
def test_stop_leaves_no_processes() -> None:
    with SmtpSink(data_delay=5.0) as slow:  # keeps smtp transports busy in DATA
        ex = EximInstance(config_text=EximConfig(sink_port=slow.port))
        ex.start()
        config = ex.config_path
        assert str(config) in TRUSTED_CONFIGS.read_text().splitlines()
        ex.inject(4, connections=2)
        deadline = time.monotonic() + 10
        while len(slow.connections) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        busy = ex.processes()
        assert len(busy) > 1  # daemon plus deliveries in flight
        ex.stop()
        assert processes_using(config) == []
        for pid in busy:
            state = _state(pid)
            assert state in (None, "Z"), f"pid {pid} still alive ({state})"
        assert str(config) not in TRUSTED_CONFIGS.read_text().splitlines()
        assert not config.exists()  # own temporary workdir removed


@pytest.mark.e2e
@needs_exim
def test_bad_config_is_reported() -> None:
    ex = EximInstance(config_text="this is not = an exim option\n")
    with pytest.raises(EximError, match="main option"):
        ex.start()
    ex.stop()


def _state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()[0]

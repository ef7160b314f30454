"""The simulator's per-IP limit overrides (``limit IP KEY VALUE`` / ``unlimit IP``), used
by the Postfix e2e tests to make exactly one IP of a pool hit TSS04."""
from __future__ import annotations

from governor.sim.replies import TSS04
from governor.sim.settings import Settings
from governor.sim.state import SimState


def _send(state: SimState, ip: str, n: int) -> list[str | None]:
    conn, reply = state.connect(ip)
    assert reply is None
    out = []
    for _ in range(n):
        r = state.mail(conn)
        out.append(r.kind if r else None)
        if r is None:
            state.data(conn, 1)
        else:
            break
    state.disconnect(conn)
    return out


def test_max_rate_override_throttles_only_that_ip() -> None:
    now = [1000.0]
    state = SimState(Settings(max_rate=100), clock=lambda: now[0])
    state.set_ip_limit("127.0.0.3", "max_rate", 2)
    assert _send(state, "127.0.0.3", 3) == [None, None, TSS04]
    assert _send(state, "127.0.0.2", 3) == [None, None, None]
    stats = state.stats(include_times=False)["ips"]
    assert stats["127.0.0.3"]["limits"] == {"max_rate": 2} and stats["127.0.0.2"]["limits"] == {}
    state.set_ip_limit("127.0.0.3", "", None)
    assert state.limit("127.0.0.3", "max_rate") == 100


def test_max_conn_override_and_control_commands() -> None:
    from governor.sim.server import Simulator

    sim = Simulator(Settings())
    assert sim.command("limit 127.0.0.4 max_conn 1") == {"ok": True, "ip": "127.0.0.4", "limits": {"max_conn": 1}}
    first, _ = sim.state.connect("127.0.0.4")
    second, reply = sim.state.connect("127.0.0.4")           # two open > max_conn 1: TSS04 at MAIL
    assert reply is None and sim.state.mail(second).kind == TSS04
    assert sim.state.mail(first) is None                      # the admitted session keeps going
    other, _ = sim.state.connect("127.0.0.5")
    assert sim.state.mail(other) is None                      # other IPs keep the global limit
    assert not sim.command("limit 127.0.0.4 penalty 3")["ok"]
    assert not sim.command("limit 127.0.0.4 max_conn zero")["ok"]
    assert sim.command("unlimit 127.0.0.4")["ok"] and sim.state.ip_limits == {}

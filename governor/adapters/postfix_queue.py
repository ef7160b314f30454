"""Postfix's side of the queue agent: ``postqueue -j``, ``postsuper -h/-H``, ``postqueue -i``.

Measured (docs/postfix-levers.md §5, notes/mta-lab.md §2):

* ``postsuper -h`` on a message in the *active* queue stops it at once (qmgr logs
  ``open active ID: No such file``); a delivery already handed to smtp(8) finishes.
* Releasing with ``postsuper -H`` + ``postqueue -i`` is **not safe** for mail held from
  the active queue: qmgr keeps the message in memory, still assigned to the cooling
  IP's slot, until that slot's turn comes ("open active ID: No such file"); a message
  released before then is delivered through the cooling IP after all (seen in the e2e
  lab: deliveries 6 s into a cooldown). ``postsuper -r`` (requeue) gives the message a
  new queue file and id, so the stale entry finds nothing, and the new one is resolved
  afresh through the transport map. Recipients already delivered stay done (measured:
  a mixed message requeued from hold delivered only its Yahoo recipient again).
* Requeued mail waits in maildrop for pickup's next wake-up (up to 60 s);
  ``postkick public pickup W`` wakes it at once (measured: delivered 0.07 s later).
* ``postsuper -h -`` / ``-H -`` read queue ids on stdin (one process per batch) and
  report ``postsuper: ID: placed on hold`` / ``released from hold`` per message on stderr.
* A message held past ``maximal_queue_lifetime`` and then released was delivered,
  not bounced.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from governor.adapters.queue_agent import QueueCommandError, QueuedMessage
from governor.domains import DomainSet, domain_of

STATES = {"incoming": "incoming", "active": "active", "deferred": "deferred", "hold": "hold",
          "maildrop": "incoming"}
_HELD = re.compile(r"^postsuper: ([0-9A-Za-z]+): placed on hold", re.MULTILINE)
_REQUEUED = re.compile(r"^postsuper: ([0-9A-Za-z]+): requeued", re.MULTILINE)


def parse_queue(text: str, domains: DomainSet) -> list[QueuedMessage]:
    """``postqueue -j`` output -> the messages with at least one governed recipient."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        msg = _message(entry, domains)
        if msg is not None:
            out.append(msg)
    return out


def _message(entry: dict, domains: DomainSet) -> QueuedMessage | None:
    governed, reasons = [], []
    for r in entry.get("recipients", []):
        address = str(r.get("address", ""))
        domain = domain_of(address)
        if domain is not None and domains.is_governed(domain):
            governed.append(address)
            if r.get("delay_reason"):
                reasons.append(str(r["delay_reason"]))
    if not governed:
        return None
    state = STATES.get(str(entry.get("queue_name", "")), str(entry.get("queue_name", "")))
    return QueuedMessage(queue_id=str(entry["queue_id"]), recipients=tuple(governed), state=state,
                         arrival=float(entry.get("arrival_time", 0)), reason=reasons[0] if reasons else "")


@dataclass
class PostfixQueue:
    """:class:`~governor.adapters.queue_agent.QueueBackend` for one Postfix instance."""

    config_directory: str = "/etc/postfix"
    command_directory: str = "/usr/sbin"
    timeout: float = 30.0
    mta: str = "postfix"

    def _run(self, argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "MAIL_CONFIG": self.config_directory}
        cmd = [f"{self.command_directory}/{argv[0]}", "-c", self.config_directory, *argv[1:]]
        try:
            proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env,
                                  timeout=self.timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise QueueCommandError(f"{' '.join(cmd)}: {exc}") from None
        if proc.returncode != 0:
            raise QueueCommandError(f"{' '.join(cmd)} exited {proc.returncode}: "
                                    f"{(proc.stderr or proc.stdout).strip()[:300]}")
        return proc

    def list_governed(self, domains: DomainSet) -> list[QueuedMessage]:
        return parse_queue(self._run(["postqueue", "-j"]).stdout, domains)

    def hold(self, ids: list[str]) -> list[str]:
        if not ids:
            return []
        proc = self._run(["postsuper", "-h", "-"], stdin="".join(f"{i}\n" for i in ids))
        return _HELD.findall(proc.stderr)

    def release(self, ids: list[str]) -> list[str]:
        """Requeue the held ones (``postsuper -r - hold``: only messages still in the hold
        queue, never one being delivered) and wake pickup; ``postqueue -i`` the others
        (deferred mail the transport map put off: not in qmgr's memory, safe to kick)."""
        if not ids:
            return []
        proc = self._run(["postsuper", "-r", "-", "hold"], stdin="".join(f"{i}\n" for i in ids))
        requeued = _REQUEUED.findall(proc.stderr)
        if requeued:
            self._run(["postkick", "public", "pickup", "W"])
        done = set(requeued)
        for qid in ids:
            if qid in done:
                continue
            try:
                self._run(["postqueue", "-i", qid])
            except QueueCommandError:
                continue
            done.add(qid)
        return [q for q in ids if q in done]

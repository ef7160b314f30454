"""Logging for the long-running programs: syslog and/or stderr, one key=value line per event.

Why this shape:

- Mail admins read governor lines next to Postfix's and Exim's, so they go to syslog
  with the configured facility (``mail`` by default) and ident, with the PID like
  ``LOG_PID`` (``yahoo-governor[1234]: event=feedback ip=...``).
- ``key=value`` lines (logfmt) can be grepped and parsed without a schema; values with
  spaces or quotes are double-quoted, control characters never reach the log.
- The daemon must never block its event loop on a slow syslog: records are queued and
  written by one listener thread (``QueueHandler``/``QueueListener``).
- Without a syslog socket (containers, this lab) the lines go to stderr instead of
  being lost.
- Every automatic reaction and admin action is also one ``action=... by=...`` line on
  the ``governor.audit`` logger (:func:`audit`), at NOTICE whatever ``logging.level``
  says, carrying the MTA queue id when there is one, so ``grep action=`` on mail.log
  shows what the governor and its operators did next to what Postfix/Exim did.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import re
import sys
from typing import Any

NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "notice": NOTICE, "warning": logging.WARNING,
          "error": logging.ERROR}
SYSLOG_SOCKETS = ("/dev/log", "/var/run/syslog")
VALUE_MAX = 300
_NEEDS_QUOTES = re.compile(r'[\s"=\\]')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

AUDIT_LOGGER = "governor.audit"

_installed: tuple[logging.handlers.QueueListener, logging.Handler] | None = None
_stderr = False


def kv(**fields: Any) -> str:
    """``event=feedback ip=192.0.2.10 reply="421 4.7.0 [TSS04] ..."``: logfmt, in argument order.

    None becomes ``-``; long values are cut to 300 characters; control characters
    become spaces, so one event is always one line.
    """
    parts = []
    for key, value in fields.items():
        text = "-" if value is None else str(value)
        if len(text) > VALUE_MAX:
            text = text[:VALUE_MAX - 3] + "..."
        text = _CONTROL.sub(" ", text)
        if not text or _NEEDS_QUOTES.search(text):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _syslog_handler(facility: str, ident: str, socket_path: str | None = None) -> logging.Handler | None:
    """A SysLogHandler on ``socket_path`` (default: the local syslog socket), or None when there is none."""
    for path in ((socket_path,) if socket_path else SYSLOG_SOCKETS):
        if not os.path.exists(path):
            continue
        try:
            handler = logging.handlers.SysLogHandler(
                address=path, facility=logging.handlers.SysLogHandler.facility_names[facility])
        except OSError:
            continue
        handler.ident = f"{ident}[{os.getpid()}]: "  # LOG_PID
        handler.priority_map = {**handler.priority_map, "NOTICE": "notice"}
        handler.setFormatter(logging.Formatter("%(message)s"))
        return handler
    return None


def setup(settings: Any, *, stderr: bool | None = None, level: str | None = None,
          name: str = "governor", fallback: bool = True) -> logging.Logger:
    """Configure the ``governor`` logger from ``config.logging`` (a governor.config.Logging).

    ``stderr`` overrides ``logging.stderr``; ``level`` overrides ``logging.level``.
    ``fallback=False`` (admin commands) does not send lines to stderr when there is no
    syslog: the operator's terminal is for the command's own output. Call again after
    fork (the PID is part of the ident); call :func:`shutdown` at exit to flush the queue.
    """
    shutdown()
    handlers: list[logging.Handler] = []
    if settings.syslog:
        sys_handler = _syslog_handler(settings.facility, settings.ident, getattr(settings, "syslog_socket", None))
        if sys_handler is not None:
            handlers.append(sys_handler)
    want_stderr = settings.stderr if stderr is None else stderr
    global _stderr
    _stderr = bool(want_stderr or (fallback and not handlers))
    if _stderr:
        err = logging.StreamHandler(sys.stderr)
        err.setFormatter(logging.Formatter(
            f"%(asctime)s {settings.ident}[{os.getpid()}]: %(levelname)s %(message)s"))
        handlers.append(err)
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(q, *handlers, respect_handler_level=False)
    front = logging.handlers.QueueHandler(q)
    logger = logging.getLogger(name)
    logger.setLevel(LEVELS[level or settings.level])
    logger.addHandler(front)
    logger.propagate = False
    logging.getLogger(AUDIT_LOGGER).setLevel(NOTICE)  # audit lines pass any logging.level
    listener.start()
    global _installed
    _installed = (listener, front)
    return logger


def audit(action: str, **fields: Any) -> None:
    """One audit line: ``action=pause ip=127.0.0.2 by=root reason="..." until=...``.

    For every automatic reaction (``by=policy``, ``by=queue-agent``, ``by=milter``) and
    every admin action (``by=`` the Unix user). Pass ``queue_id`` whenever a message is
    concerned: it is what ties the line to the MTA's own log lines. Fields that are None
    are left out. The store's audit stream remains the record; this is its mirror in
    syslog.
    """
    logging.getLogger(AUDIT_LOGGER).log(NOTICE, kv(action=action, **{k: v for k, v in fields.items()
                                                                       if v is not None}))


def active() -> bool:
    """True when :func:`setup` installed logging in this process (and it is not shut down)."""
    return _installed is not None


def to_stderr() -> bool:
    """True when the installed logging writes to stderr (so callers don't print twice)."""
    return _installed is not None and _stderr


def shutdown(name: str = "governor") -> None:
    """Flush and stop the listener thread installed by :func:`setup` (idempotent)."""
    global _installed
    if _installed is None:
        return
    listener, front = _installed
    _installed = None
    logger = logging.getLogger(name)
    logger.removeHandler(front)
    logger.propagate = True  # back to the default: records reach the root logger again
    listener.stop()
    for handler in listener.handlers:
        handler.close()

"""Who may be a worker: the checks the broker applies to its back end's peers.

Local workers connect over `ipc://` in the broker's 0700 runtime folder, with an identity the broker
drew at random and handed only to the process it spawned; their READY must carry that process's pid.
Anything else that reaches the back end (a process of the same user that found the socket) is
ignored, and logged at a bounded rate so a flood of forgeries cannot flood the log.
"""
from __future__ import annotations

import logging
import time
from typing import Any

STRANGER_LOG_INTERVAL = 10.0  # seconds between two log lines about peers that are not our workers


class LogLimiter:
    """Logs the first event at once, then at most one line per `interval` seconds, counting the
    events it held back in between."""

    def __init__(self, logger: logging.Logger, interval: float = STRANGER_LOG_INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self.next_at = 0.0
        self.held_back = 0

    def warning(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.held_back += 1
            return
        if self.held_back:
            message += f" ({self.held_back} more like it in the last {self.interval:.0f} s not logged)"
        self.logger.warning(message, *args)
        self.next_at, self.held_back = now + self.interval, 0


def ready_is_from_spawned(info: Any, spawned_pid: int | None) -> bool:
    """True when a READY's payload names the pid of the process the broker spawned for this identity."""
    return isinstance(info, dict) and spawned_pid is not None and info.get("pid") == spawned_pid

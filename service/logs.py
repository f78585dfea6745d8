"""Log set-up for the server's processes (`configure_logging`: called by entry points only, app.py and
worker start-up), and a limiter for lines a peer could make the server repeat."""
from __future__ import annotations

import logging
import sys
import time
from typing import Any

DEFAULT_INTERVAL = 10.0  # seconds between two lines of one LogLimiter


def configure_logging(verbose: bool) -> None:
    """One readable line per event: time, level, process, message; colour only on a terminal."""
    colour = sys.stderr.isatty()
    fmt = "%(asctime)s %(levelname).1s %(processName)-8s %(message)s"
    if colour:
        fmt = "\033[2m%(asctime)s\033[0m %(levelname).1s \033[36m%(processName)-8s\033[0m %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


class LogLimiter:
    """Logs the first event at once, then at most one line per `interval` seconds, counting the
    events it held back in between."""

    def __init__(self, logger: logging.Logger, interval: float = DEFAULT_INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self.next_at = 0.0
        self.logged_at = 0.0  # when the last line was logged
        self.held_back = 0

    def warning(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.held_back += 1
            return
        if self.held_back:  # counted since the last line, however long ago that was
            message += (f" ({self.held_back} more like it since the last such line, "
                        f"{now - self.logged_at:.0f} s ago, not logged)")
        self.logger.warning(message, *args)
        self.next_at, self.logged_at, self.held_back = now + self.interval, now, 0

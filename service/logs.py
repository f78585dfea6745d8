"""Log set-up for the server's processes (called by entry points only: app.py and worker start-up)."""
from __future__ import annotations

import logging
import sys


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

"""Doors: extra front ends (HTTP, the 2019 protocol) that run in processes of their own.

A door is one more client of the broker: it connects a DEALER to the broker's private door socket
(`ipc://` in a 0700 folder, so no other local user can reach it) and speaks the wire protocol of
`service/client.py`, so limits, batching, fair sharing and failover stay in the broker.

    broker process ──spawns──► door process: target(config, broker_address, ready)
                                 binds its own port, calls ready.set() (a ReadySignal), serves until SIGTERM

A door never outlives the server: the kernel kills it when the broker process dies, even by
SIGKILL (PR_SET_PDEATHSIG). A door that exits while the server runs is restarted, later each time
it keeps dying. Each door adds itself to `door_specs` with the flag that turns it on.
"""
from __future__ import annotations

import ctypes
import importlib
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from .config import ServerConfig
from .errors import StartupError
from .logs import configure_logging

log = logging.getLogger(__name__)

DOOR_START_TIMEOUT = 60.0    # seconds a door may take to import its modules and bind its port
DOOR_STOP_GRACE = 5.0        # seconds a door gets to finish after SIGTERM
DOOR_RESPAWN_BACKOFF_MAX = 30.0
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class DoorSpec:
    """A door: its name in logs, and `module:function` of its entry point
    `function(config: ServerConfig, broker_address: str, ready: ReadySignal) -> None`."""

    name: str
    entry: str


def door_specs(config: ServerConfig) -> list[DoorSpec]:
    """The doors the configuration turns on (none by default)."""
    specs: list[DoorSpec] = []
    if config.http_port is not None:
        specs.append(DoorSpec("http", "service.http:serve"))
    if config.v1_port is not None:
        specs.append(DoorSpec("v1", "service.v1door:serve"))
    return specs


def door_main(spec: DoorSpec, config: ServerConfig, broker_address: str, parent_pid: int, ready: Any) -> None:
    """Entry point of a door process (started with the 'spawn' method)."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the broker decides
    configure_logging(config.verbose)
    module, function = spec.entry.split(":")
    getattr(importlib.import_module(module), function)(config, broker_address, ready)


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies, however it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux/glibc: the check below is all there is
        pass
    if os.getppid() != parent_pid:  # the parent died before the request above took effect
        os._exit(1)


class ReadySignal:
    """A child process's one "ready" to its parent, over a pipe. Not a multiprocessing.Event: its
    named semaphores live in /dev/shm and outlive a process group killed by SIGKILL, resource tracker
    and all (the test suite's kills had left 245 there)."""

    def __init__(self, context: Any) -> None:
        self._reader, self._writer = context.Pipe(duplex=False)

    def set(self) -> None:
        """In the child: say ready."""
        self._writer.send_bytes(b"ready")

    def wait(self, timeout: float) -> bool:
        """In the parent: whether the child has said ready, waiting up to `timeout` seconds."""
        return self._reader.poll(timeout)


@dataclass(eq=False)
class DoorProcess:
    spec: DoorSpec
    process: Any = None
    ready: Any = None
    started: float = 0.0
    quick_deaths: int = 0
    respawn_at: float | None = None
    restarts: int = field(default=0)


class Doors:
    """Starts, watches and stops the configured doors (owned by the broker, one thread)."""

    def __init__(self, config: ServerConfig, broker_address: str) -> None:
        self.config = config
        self.broker_address = broker_address
        self.doors = [DoorProcess(spec) for spec in door_specs(config)]
        self._mp = multiprocessing.get_context("spawn")

    def start(self) -> None:
        """Start every door and wait until each has bound its port; raise StartupError if one cannot."""
        for door in self.doors:
            self._spawn(door)
        deadline = time.monotonic() + DOOR_START_TIMEOUT
        for door in self.doors:
            while not door.ready.wait(0.1):
                if door.process.exitcode is not None:
                    raise StartupError(f"the {door.spec.name} door exited with code {door.process.exitcode} "
                                       "while starting (its error is logged above)")
                if time.monotonic() > deadline:
                    raise StartupError(f"the {door.spec.name} door did not start within {DOOR_START_TIMEOUT:.0f} s")

    def _spawn(self, door: DoorProcess) -> None:
        door.ready = ReadySignal(self._mp)
        door.process = self._mp.Process(target=door_main, name=f"{door.spec.name}-door", daemon=True,
                                        args=(door.spec, self.config, self.broker_address, os.getpid(), door.ready))
        door.process.start()
        door.started, door.respawn_at = time.monotonic(), None
        log.debug("started the %s door (pid %s)", door.spec.name, door.process.pid)

    def check(self, now: float) -> None:
        """Restart doors that exited, later each time one keeps dying soon after its start."""
        for door in self.doors:
            if door.respawn_at is not None:
                if now >= door.respawn_at:
                    self._spawn(door)
                continue
            if door.process is None or door.process.exitcode is None:
                continue
            door.restarts += 1
            door.quick_deaths = door.quick_deaths + 1 if now - door.started < 30 else 0
            delay = min(DOOR_RESPAWN_BACKOFF_MAX, 2.0 ** door.quick_deaths) if door.quick_deaths else 0.0
            log.error("the %s door (pid %s) exited with code %s; restarting it%s", door.spec.name,
                      door.process.pid, door.process.exitcode, f" in {delay:.0f} s" if delay else "")
            door.respawn_at = now + delay

    def stop(self) -> None:
        """SIGTERM every door, then SIGKILL what is left after a grace period."""
        alive = [d.process for d in self.doors if d.process is not None and d.process.exitcode is None]
        for process in alive:
            process.terminate()
        deadline = time.monotonic() + DOOR_STOP_GRACE
        for process in alive:
            process.join(timeout=max(0.1, deadline - time.monotonic()))
            if process.exitcode is None:
                process.kill()
                process.join(timeout=2)

    def status(self) -> list[dict]:
        return [{"name": d.spec.name, "pid": d.process.pid if d.process else None,
                 "alive": d.process is not None and d.process.exitcode is None, "restarts": d.restarts}
                for d in self.doors]

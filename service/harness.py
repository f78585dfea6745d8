"""Start and stop a real `app.py` on loopback: used by the tests, benchmark.py and tools/soak.py.

    with RunningServer(["-num_worker", "2"]) as server:             # on the CPU unless device="auto"
        with BertClient(port=server.port, timeout=10) as bc:
            bc.encode(["hello"])

The server runs in its own process group; it is stopped by its process id (SIGTERM, then SIGKILL
to the group), never by name, and its log is kept for the assertion messages.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Servers started here keep their exported ONNX graphs in the temporary folder, not in the user's
# home: tests and benchmarks must not fill ~/.cache, and one export serves every later start.
ONNX_CACHE_DIR = Path(tempfile.gettempdir()) / f"bert-as-service-onnx-{os.getuid()}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """A real `python app.py` process listening on 127.0.0.1 at a free port."""

    ready_marker = "ready on tcp://"  # the log line `wait_until_ready` waits for

    def __init__(self, args: list[str] | None = None, port: int | None = None, ready_timeout: float = 120.0,
                 wait_ready: bool = True, device: str = "cpu", env: dict[str, str] | None = None,
                 root: Path = ROOT) -> None:
        """`device`: "cpu" adds `-cpu`, so a test means the same on a machine with a GPU;
        "auto" lets the server choose (a GPU where one is visible), as benchmarks want.
        `env`: variables to set in the server's environment, on top of this process's.
        `root`: the checkout whose `app.py` runs (another commit's, for a before/after in one run)."""
        if device not in ("cpu", "auto"):
            raise ValueError(f"device must be 'cpu' or 'auto', got {device!r}")
        self.args = (["-cpu"] if device == "cpu" else []) + list(args or [])
        if "-onnx_cache_dir" not in self.args:
            self.args += ["-onnx_cache_dir", str(ONNX_CACHE_DIR)]
        self.port = port or free_port()
        self.root = Path(root)
        self.ready_timeout = ready_timeout
        self.wait_ready = wait_ready
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.process: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="app-", suffix=".log", delete=False)

    ready_count = 1

    @property
    def command(self) -> list[str]:
        return [sys.executable, str(self.root / "app.py"), "-host", "127.0.0.1", "-port", str(self.port), *self.args]

    def start(self) -> "RunningServer":
        self.process = subprocess.Popen(self.command, cwd=self.root, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        if self.wait_ready:
            self.wait_until_ready()
        return self

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while self.log().count(self.ready_marker) < self.ready_count:
            if self.process.poll() is not None:
                raise RuntimeError(f"app.py exited with code {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"app.py not ready within {self.ready_timeout} s:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Stop the server and every process it started; return its exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of the group (workers of a server that was killed)
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.process.poll() is None:
            self.process.wait(timeout=10)
        return self.process.returncode

    def __enter__(self) -> "RunningServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        os.unlink(self._log.name)


class RunningWorkerHost(RunningServer):
    """A real `python app.py -join tcp://...` worker host, ready once each of its workers has joined.

    with RunningServer(["-num_worker", "0", "-worker_port", str(wp)]) as head, \
            RunningWorkerHost(f"tcp://127.0.0.1:{wp}", ["-num_worker", "2"]) as host: ...
    """

    ready_marker = "joined the head at"

    def __init__(self, head: str, args: list[str] | None = None, workers: int = 1, **options) -> None:
        super().__init__(["-join", head, "-num_worker", str(workers), *(args or [])], **options)
        self.ready_count = workers

    @property
    def command(self) -> list[str]:
        return [sys.executable, str(ROOT / "app.py"), *self.args]


def group_pids(pgid: int) -> list[int]:
    """Process ids still alive in process group `pgid` (to check that nothing was left behind)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = proc_stat(int(entry.name))
            if fields and int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, ... utime at index 11,
    stime at 12); None when the process is gone."""
    try:
        # The command name is in parentheses and may hold spaces and ')': split after the last one.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_ticks(pids: Iterable[int]) -> int:
    """utime + stime of every thread of these processes, in clock ticks (os.sysconf("SC_CLK_TCK")
    a second); those that exited meanwhile count 0."""
    return sum(int(fields[11]) + int(fields[12]) for fields in map(proc_stat, pids) if fields)


def rss_kb(pid: int) -> int | None:
    """Resident memory of a process in kB (VmRSS); None when the process is gone."""
    try:
        found = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return None
    return int(found[1]) if found else None


def wait_for(condition, timeout: float, what: str, interval: float = 0.1):
    """Poll `condition()` until it returns something truthy (returned); fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")

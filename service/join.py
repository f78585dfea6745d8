"""A worker host: `python app.py -join tcp://HEAD:PORT` serves a head's queue with this host's devices.

    this process (supervisor) ──spawns──► N worker processes ──TCP (CurveZMQ with -auth_dir)──► head's worker port

Each worker is a Paranoid Pirate worker (the ZeroMQ guide's `ppworker.py`): on a fresh socket it says
HELLO with this host's model fingerprint, and the head answers WELCOME with every option that changes
a vector (the worker then loads the model with them and says READY) or REFUSED (another model: the
worker exits EXIT_REFUSED and so does this host, non-zero). A head that does not answer is waited
for; one that falls silent, or answers STOP (it restarted, or gave this worker up), is joined again
on a fresh socket, without loading the model again unless the head's options changed.

The supervisor restarts a worker that dies (later each time it keeps dying), and stops them all on
SIGTERM or Ctrl-C. Workers die with it, even when it is SIGKILLed (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import socket as socketlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from bert.checkpoint import inspect_folder

from . import protocol as P
from .backend import jobs_wanted, model_fingerprint
from .config import ServerConfig
from .doors import _die_with_parent
from .errors import StartupError
from .logs import configure_logging

log = logging.getLogger(__name__)

EXIT_REFUSED = 3      # the head refused this worker (another model, protocol): retrying cannot help
EXIT_RELOAD = 4       # the head's options changed: start again to load the model with them
HELLO_TIMEOUT = P.HEARTBEAT_INTERVAL * P.HEARTBEAT_LIVENESS  # seconds a HELLO waits, then a fresh socket
WAITING_LOG_INTERVAL = 30.0  # seconds between "still waiting for the head" lines
RECONNECT_IVL_MAX_MS = 2000  # libzmq's own reconnect backoff, so a refusing head is not hammered


@dataclass(frozen=True)
class WorkerKeys:
    """CurveZMQ keys of a worker host: the head's public key and this host's key pair."""

    server_public: bytes
    public: bytes
    secret: bytes


def load_worker_keys(config: ServerConfig) -> WorkerKeys | None:
    """`auth_dir/server.key` and `auth_dir/workers/NAME.key_secret` (made by `-keygen DIR -worker_name
    NAME` on the head); None without -auth_dir."""
    if config.auth_dir is None:
        return None
    from .auth import server_key_paths

    server_public = server_key_paths(config.auth_dir)[0]
    own = Path(config.auth_dir) / "workers" / f"{config.worker_name}.key_secret"
    for path in (server_public, own):
        if not path.is_file():
            raise StartupError(f"{path}: not found; make worker keys on the head with: python app.py -keygen DIR "
                               f"-worker_name {config.worker_name}, and copy DIR/server.key and "
                               f"DIR/workers/{config.worker_name}.key_secret here")
    public, secret = zmq.auth.load_certificate(str(own))
    if secret is None:
        raise StartupError(f"{own}: holds no secret key")
    return WorkerKeys(zmq.auth.load_certificate(str(server_public))[0], public, secret)


# ---------------------------------------------------------------- the supervisor


@dataclass(eq=False)
class HostWorker:
    index: int
    process: Any = None
    restarts: int = 0
    started: float = 0.0
    quick_deaths: int = 0
    respawn_at: float | None = None


class JoinHost:
    """Starts this host's workers, restarts those that die, stops them all at the end."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.stop_requested = False
        self.workers = [HostWorker(i) for i in range(config.num_worker)]
        self.fingerprint: dict[str, str] = {}
        self.keys: WorkerKeys | None = None
        self._mp = multiprocessing.get_context("spawn")

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (0), or until the head refuses this host (1)."""
        self.keys = load_worker_keys(self.config)
        self.fingerprint = model_fingerprint(inspect_folder(self.config.encoder.model_dir))
        log.info("worker host %s: %d worker%s join %s (model fingerprint %s)", socketlib.gethostname(),
                 len(self.workers), "s" if len(self.workers) > 1 else "", self.config.join,
                 "/".join(v[:8] for v in self.fingerprint.values()))
        for worker in self.workers:
            self.spawn(worker)
        try:
            while not self.stop_requested:
                code = self.check(time.monotonic())
                if code is not None:
                    return code
                time.sleep(0.2)
            return 0
        finally:
            self.stop()

    def spawn(self, worker: HostWorker) -> None:
        worker.process = self._mp.Process(
            target=remote_worker_main, name=f"worker-{worker.index}", daemon=True,
            args=(self.config, worker.index, worker.restarts, self.fingerprint, self.keys, os.getpid()))
        worker.process.start()
        worker.started, worker.respawn_at = time.monotonic(), None

    def check(self, now: float) -> int | None:
        """Restart workers that exited; the exit code when the host must stop."""
        for worker in self.workers:
            if worker.respawn_at is not None:
                if now >= worker.respawn_at:
                    self.spawn(worker)
                continue
            code = worker.process.exitcode
            if code is None:
                continue
            if code == EXIT_REFUSED:
                log.error("the head at %s refused this host's worker %d (why is logged above); the worker host "
                          "exits", self.config.join, worker.index)
                return 1
            worker.restarts += 1
            if code == EXIT_RELOAD:
                self.spawn(worker)
                continue
            worker.quick_deaths = worker.quick_deaths + 1 if now - worker.started < 30 else 0
            delay = min(P.RESPAWN_BACKOFF_MAX, 2.0 ** (worker.quick_deaths - 1)) if worker.quick_deaths > 1 else 0.0
            log.error("worker %d (pid %s) exited with code %s; restarting it%s", worker.index, worker.process.pid,
                      code, f" in {delay:.0f} s" if delay else "")
            worker.respawn_at = now + delay
        return None

    def stop(self) -> None:
        alive = [w.process for w in self.workers if w.process is not None and w.process.exitcode is None]
        for process in alive:
            process.terminate()
        deadline = time.monotonic() + 5
        for process in alive:
            process.join(timeout=max(0.1, deadline - time.monotonic()))
            if process.exitcode is None:
                process.kill()
                process.join(timeout=2)
        log.info("worker host stopped")


# ---------------------------------------------------------------- a worker process


def remote_worker_main(config: ServerConfig, index: int, restarts: int, fingerprint: dict[str, str],
                       keys: WorkerKeys | None, parent_pid: int) -> None:
    """Entry point of a worker process of a worker host (started with the 'spawn' method)."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the supervisor decides
    configure_logging(config.verbose)
    os.environ.setdefault("RAYON_NUM_THREADS", str(config.threads_per_worker))  # before `tokenizers` loads
    raise SystemExit(HeadLink(config, index, restarts, fingerprint, keys).serve(parent_pid))


class HeadLink:
    """One worker's membership of a head: join, serve until the head is lost, join again."""

    def __init__(self, config: ServerConfig, index: int, restarts: int, fingerprint: dict[str, str],
                 keys: WorkerKeys | None) -> None:
        self.config = config
        self.index = index
        self.restarts = restarts
        self.fingerprint = fingerprint
        self.keys = keys
        self.host = socketlib.gethostname()
        self.waiting_since: float | None = None
        self.next_waiting_log = 0.0

    def serve(self, parent_pid: int) -> int:
        from .worker import Worker, load_encoder

        context = zmq.Context()
        encoder, options, run_config = None, None, self.config
        try:
            while os.getppid() == parent_pid:
                socket = self.connect(context)
                try:
                    answer = self.hello(socket)
                    if answer is None:
                        continue
                    command, body = answer
                    if command == P.REFUSED:
                        log.error("the head at %s refused worker %d: %s", self.config.join, self.index,
                                  body.get("message"))
                        return EXIT_REFUSED
                    if encoder is None:
                        run_config, options = self.configured(body), body
                        try:
                            encoder = self.load_with_heartbeats(socket, lambda: load_encoder(
                                run_config, self.index, run_config.threads_per_worker))
                        except Exception as e:  # reported to the head, then this process ends
                            log.exception("worker %d could not load the model", self.index)
                            socket.send_multipart([P.FAILED, P.dumps({"message": f"{type(e).__name__}: {e}"})])
                            return 2
                    elif body != options:
                        log.info("worker %d: the head's options changed; it starts again to load the model with them",
                                 self.index)
                        return EXIT_RELOAD
                    socket.send_multipart([P.READY, P.dumps(self.ready_info(encoder))])
                    log.info("worker %d joined the head at %s (%s, %d jobs in hand)", self.index, self.config.join,
                             encoder.device, jobs_wanted(str(encoder.device)))
                    Worker(encoder, run_config, socket, context, parent_pid).run()
                    log.warning("worker %d lost the head at %s; joining again", self.index, self.config.join)
                finally:
                    socket.close(linger=0)
            return 0
        finally:
            context.destroy(linger=0)

    @staticmethod
    def load_with_heartbeats(socket: zmq.Socket, load: Any) -> Any:
        """`load()`, heartbeating meanwhile, so the head tells a worker that loads from one whose
        connection is gone (it cannot see a TCP connection close). The socket belongs to the
        heartbeat thread until it is joined, so one thread at a time uses it, as ZeroMQ requires."""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(P.HEARTBEAT_INTERVAL):
                socket.send_multipart([P.HEARTBEAT])

        thread = threading.Thread(target=beat, name="loading-heartbeat", daemon=True)
        thread.start()
        try:
            return load()
        finally:
            done.set()
            thread.join()

    def connect(self, context: zmq.Context) -> zmq.Socket:
        """A fresh DEALER to the head (Paranoid Pirate: nothing from an earlier try is delivered)."""
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        if self.keys is not None:
            socket.curve_serverkey = self.keys.server_public
            socket.curve_publickey, socket.curve_secretkey = self.keys.public, self.keys.secret
        socket.connect(self.config.join)
        return socket

    def hello(self, socket: zmq.Socket) -> tuple[bytes, dict] | None:
        """(WELCOME or REFUSED, its body), or None when the head did not answer in HELLO_TIMEOUT."""
        socket.send_multipart([P.HELLO, P.dumps({
            "protocol": P.REMOTE_PROTOCOL, "pid": os.getpid(), "host": self.host, "index": self.index,
            "restarts": self.restarts, "fingerprint": self.fingerprint})])
        deadline = time.monotonic() + HELLO_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            if not socket.poll(int(left * 1000)):
                break
            frames = socket.recv_multipart()
            if frames[0] in (P.WELCOME, P.REFUSED) and len(frames) > 1:
                self.waiting_since = None
                return frames[0], P.loads(frames[1])
        self.log_waiting()
        return None

    def log_waiting(self) -> None:
        now = time.monotonic()
        self.waiting_since = self.waiting_since or now - HELLO_TIMEOUT
        if now < self.next_waiting_log:
            return
        self.next_waiting_log = now + WAITING_LOG_INTERVAL
        keys = "" if self.keys else (" (a head with -auth_dir answers only workers started with -auth_dir DIR holding "
                                     "server.key and workers/NAME.key_secret)")
        log.warning("worker %d: no answer from the head at %s for %.0f s; waiting for it%s", self.index,
                    self.config.join, now - self.waiting_since, keys)

    def configured(self, welcome: dict) -> ServerConfig:
        """This host's configuration with every option that changes a vector taken from the head."""
        head = welcome.get("encoder", {})
        layers = head.get("pooling_layer")
        encoder = dataclasses.replace(
            self.config.encoder, pooling_strategy=head.get("pooling_strategy"),
            pooling_layer=tuple(layers) if layers is not None else None, mask_cls_sep=bool(head.get("mask_cls_sep")),
            normalize=head.get("normalize"), max_seq_len=head.get("max_seq_len"),
            do_lower_case=head.get("do_lower_case"), dtype=head.get("dtype", "auto"))
        return dataclasses.replace(self.config, encoder=encoder, output_dtype=welcome.get("output_dtype", "float32"))

    def ready_info(self, encoder: Any) -> dict:
        return {"pid": os.getpid(), "device": str(encoder.device), "encoder": encoder.describe(),
                "threads": self.config.threads_per_worker, "capacity": jobs_wanted(str(encoder.device)),
                "host": self.host, "index": self.index, "restarts": self.restarts}

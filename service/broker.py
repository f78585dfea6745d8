"""The broker: clients' requests in, mini-batches out to worker processes, replies back in order.

One thread, one poll loop over three ROUTER sockets:

    clients (DEALER) --> front end ROUTER ----[split into jobs]--> back end ROUTER --> workers (DEALER)
    doors (HTTP, ...) --> door ROUTER (ipc) --/

- The loop serves from the start: the client port and the doors open before the workers have
  loaded the model, requests wait in the queue meanwhile, and `server_status()` says how many
  workers are ready. The "ready" callback runs once every worker has loaded the model; a worker
  that cannot load it stops the server.

- A request is validated (it came from the network), split into jobs of at most `max_batch_size`
  sentences, and queued; the queue is bounded (`max_queue` sentences) and a request that does not
  fit is refused at once with a "busy" error.
- A job goes to the ready worker with the least work in hand, each holding at most
  `WORKER_PREFETCH_JOBS`, so a worker always has the next job while it computes the current one.
- Workers' replies are kept as raw frames and forwarded to the client once every job of its request
  is back: the broker never decodes a vector.
- A worker that exits or stops sending heartbeats is replaced; its jobs go back to the head of the
  queue, and a job that was on `MAX_JOB_ATTEMPTS` dying workers fails its request instead.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import zmq

from . import protocol as P
from .client import (ERR_BAD_REQUEST, ERR_BUSY, ERR_SERVER, ERR_TIMEOUT, ERR_UNAVAILABLE, BadRequestError,
                     pack_error, pack_result, pack_vectors, unpack_request)
from .config import ServerConfig
from .doors import Doors
from .errors import StartupError
from .handshakes import HandshakeWatch
from .metrics import RequestMetrics
from .worker import worker_main

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 10.0  # seconds in-flight requests get to finish on SIGINT/SIGTERM

__all__ = ["Broker", "StartupError"]


@dataclass(eq=False)
class Request:
    socket: zmq.Socket           # where the request came from, and its reply goes: front end or door socket
    client: bytes
    request_id: int
    n_jobs: int
    deadline: float | None       # unix time after which the client no longer waits
    show_tokens: bool
    sentences: int
    parts: list = field(default_factory=list)     # per job: [shape, data frame, tokens]
    done: int = 0
    finished: bool = False
    received: float = field(default_factory=time.monotonic)
    # http (metrics): when its first job went to a worker, and what the workers reported
    dispatched: float | None = None
    n_tokens: int = 0
    compute_ms: float = 0.0


@dataclass(eq=False)
class Job:
    job_id: int
    request: Request
    part: int
    payload: bytes
    size: int
    is_tokenized: bool
    attempts: int = 0


@dataclass(eq=False)
class WorkerSlot:
    """One worker process the broker keeps alive: its current incarnation and what it holds."""

    index: int
    generation: int = 0
    process: Any = None
    identity: bytes = b""
    ready: bool = False
    last_seen: float = 0.0
    started: float = 0.0
    in_flight: dict[int, Job] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    restarts: int = 0
    jobs_done: int = 0
    sentences_done: int = 0
    quick_deaths: int = 0     # deaths soon after starting, for backoff
    respawn_at: float | None = None

    @property
    def load(self) -> int:
        return sum(job.size for job in self.in_flight.values())


class Broker:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.context = zmq.Context()
        self.backend = self.context.socket(zmq.ROUTER)
        self.backend.setsockopt(zmq.LINGER, 0)
        self.backend_address = self._bind_backend()
        self.frontend: zmq.Socket | None = None
        self.handshakes: HandshakeWatch | None = None
        # Sockets only this user can reach live in a folder of mode 0700 (mkdtemp's).
        self.runtime_dir = tempfile.mkdtemp(prefix="bert-serving-")
        self.door_address = f"ipc://{self.runtime_dir}/doors"
        self.door_socket: zmq.Socket | None = None
        self.doors = Doors(config, self.door_address)
        self.authenticator = None
        self.slots = [WorkerSlot(index=i) for i in range(config.num_worker)]
        self.by_identity: dict[bytes, WorkerSlot] = {}
        self.pending: deque[Job] = deque()
        self.pending_sentences = 0
        self.job_ids = iter(range(1, 1 << 62))
        self.encoder_info: dict = {}
        self.stats = {"requests": 0, "sentences": 0, "errors": 0, "busy": 0, "bad_requests": 0,
                      "worker_restarts": 0, "timeouts_dropped": 0}
        self.metrics = RequestMetrics()  # latency histograms and tokens, observed in complete()
        self.started = time.time()
        self.stop_requested = False
        self.starting = True          # until every worker has loaded the model once
        self.startup_deadline = 0.0
        self.exit_code = 0
        self._mp = multiprocessing.get_context("spawn")

    def _bind_backend(self) -> str:
        port = self.backend.bind_to_random_port("tcp://127.0.0.1")
        return f"tcp://127.0.0.1:{port}"

    # ------------------------------------------------------------ start-up

    def start(self) -> None:
        """Open the client port and the door socket, start the doors, then the workers. Returns at
        once: the workers load the model while `serve_forever` already answers clients."""
        self.open_frontend()
        self.open_door_socket()
        self.doors.start()
        for slot in self.slots:
            self.spawn(slot)
        self.startup_deadline = time.monotonic() + self.config.startup_timeout

    def spawn(self, slot: WorkerSlot) -> None:
        slot.generation += 1
        slot.identity = f"w{slot.index}.{slot.generation}".encode()
        slot.ready, slot.in_flight, slot.info, slot.respawn_at = False, {}, {}, None
        slot.started = slot.last_seen = time.monotonic()
        slot.process = self._mp.Process(
            target=worker_main, name=f"worker-{slot.index}", daemon=True,
            args=(self.config, slot.index, slot.identity, self.backend_address, os.getpid()))
        slot.process.start()
        self.by_identity[slot.identity] = slot
        log.debug("started worker %d (pid %s)", slot.index, slot.process.pid)

    def check_startup(self, now: float) -> bool:
        """While the workers load the model: True once every one is ready; a worker that failed or
        exited, or the start-up timeout, stops the server with exit code 1."""
        failed = [s for s in self.slots if s.process.exitcode is not None and not s.ready]
        if failed:
            reason = failed[0].info.get("failure") or \
                f"worker {failed[0].index} exited with code {failed[0].process.exitcode} while loading the model " \
                "(run with -verbose for details)"
        elif now > self.startup_deadline:
            reason = f"workers did not load the model within {self.config.startup_timeout:.0f} s"
        else:
            return all(slot.ready for slot in self.slots)
        log.error("cannot start: %s", reason)
        self.exit_code, self.stop_requested = 1, True
        return False

    def mark_ready(self, slot: WorkerSlot, info: dict) -> None:
        slot.ready, slot.info, slot.last_seen = True, info, time.monotonic()
        self.encoder_info = self.encoder_info or info.get("encoder", {})

    def open_door_socket(self) -> None:
        self.door_socket = self.context.socket(zmq.ROUTER)
        self.door_socket.setsockopt(zmq.LINGER, 0)
        self.door_socket.setsockopt(zmq.MAXMSGSIZE, 4 * self.config.max_request_bytes)
        self.door_socket.bind(self.door_address)

    def open_frontend(self) -> None:
        self.frontend = self.context.socket(zmq.ROUTER)
        self.frontend.setsockopt(zmq.LINGER, 0)
        # A hard cap far above the polite limit: bigger messages drop the connection before using memory.
        self.frontend.setsockopt(zmq.MAXMSGSIZE, 4 * self.config.max_request_bytes)
        if self.config.auth_dir:
            from .auth import start_authenticator
            self.authenticator = start_authenticator(self.context, self.frontend, self.config.auth_dir)
        address = f"tcp://{self.config.host}:{self.config.port}"
        try:
            self.frontend.bind(address)
        except zmq.ZMQError as e:
            raise StartupError(f"cannot listen on {address}: {e}") from None
        # A socket has one monitor: with -auth_dir the authenticator's (service/auth.py) reports failed
        # handshakes, the 2019 client's included ("a client without CurveZMQ keys").
        if self.authenticator is None:
            v1_ports = (self.config.v1_port, self.config.v1_port_out) if self.config.v1_port else None
            self.handshakes = HandshakeWatch(self.frontend, self.config.port, v1_ports)  # wrong protocols, logged

    # ------------------------------------------------------------ the loop

    def serve_forever(self, on_ready=None) -> None:
        """Serve until `stop_requested` is set (by a signal handler, or a failed start), then shut
        down cleanly. `on_ready()` is called once, when every worker has loaded the model."""
        poller = zmq.Poller()
        for socket in (self.backend, self.frontend, self.door_socket):
            poller.register(socket, zmq.POLLIN)
        watch = self.handshakes.monitor if self.handshakes is not None else None
        if watch is not None:
            poller.register(watch, zmq.POLLIN)
        next_heartbeat = 0.0
        while not self.stop_requested:
            events = dict(poller.poll(250))
            if watch is not None and watch in events:
                self.handshakes.drain()
            if self.backend in events:
                self.drain(self.backend, self.on_worker_message)
            for socket in (self.frontend, self.door_socket):
                if socket in events:
                    self.drain(socket, lambda frames, s=socket: self.on_client_message(s, frames))
            now = time.monotonic()
            if now >= next_heartbeat:
                self.send_heartbeats()
                next_heartbeat = now + P.HEARTBEAT_INTERVAL
            if self.starting:
                if self.check_startup(now):
                    self.starting = False
                    if on_ready is not None:
                        on_ready()
            elif not self.stop_requested:  # a signal during the poll: workers may have had it too
                self.check_workers(now)
                self.doors.check(now)
            self.dispatch()
        self.shutdown()

    @staticmethod
    def drain(socket: zmq.Socket, handler, limit: int = 1000) -> None:
        """Handle what is waiting on `socket` without blocking (bounded, so neither side starves)."""
        for _ in range(limit):
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handler(frames)

    # ------------------------------------------------------------ clients

    def on_client_message(self, socket: zmq.Socket, frames: list) -> None:
        client, body = frames[0].bytes, [f.bytes for f in frames[1:]]
        request_id = _peek_id(body)
        try:
            self.handle_request(socket, client, request_id, body)
        except Exception as e:  # a safety net: no message may take the broker down with it
            log.exception("unexpected error on a request from %s", client[:12].hex())
            self.reply(socket, client, pack_error(request_id, ERR_SERVER, f"internal error: {type(e).__name__}: {e}"))

    def handle_request(self, socket: zmq.Socket, client: bytes, request_id: Any, body: list[bytes]) -> None:
        try:
            header, texts = unpack_request(body, self.config.max_client_batch_size, self.config.max_request_bytes)
        except BadRequestError as e:
            self.stats["bad_requests"] += 1
            log.warning("bad request from %s: %s", client[:12].hex(), e)
            self.reply(socket, client, pack_error(request_id, ERR_BAD_REQUEST, str(e)))
            return
        if self.stop_requested:
            self.reply(socket, client, pack_error(request_id, ERR_UNAVAILABLE, "the server is shutting down"))
        elif header["cmd"] == "config":
            self.reply(socket, client, pack_result(request_id, self.describe()))
        elif header["cmd"] == "status":
            self.reply(socket, client, pack_result(request_id, self.status()))
        else:
            self.accept(socket, client, header, texts)

    def accept(self, socket: zmq.Socket, client: bytes, header: dict, texts: list) -> None:
        if self.pending_sentences + len(texts) > self.config.max_queue:
            self.stats["busy"] += 1
            log.warning("busy: refused %d sentences, %d already queued (-max_queue %d)",
                        len(texts), self.pending_sentences, self.config.max_queue)
            self.reply(socket, client, pack_error(header["id"], ERR_BUSY,
                                          f"server busy: {self.pending_sentences} sentences queued "
                                          f"(limit {self.config.max_queue}); retry later"))
            return
        size = self.config.max_batch_size
        chunks = [texts[i:i + size] for i in range(0, len(texts), size)]
        timeout = header.get("timeout")
        request = Request(socket, client, header["id"], len(chunks), time.time() + timeout if timeout else None,
                          bool(header.get("show_tokens")), len(texts), parts=[None] * len(chunks))
        for part, chunk in enumerate(chunks):
            payload = json.dumps(chunk, ensure_ascii=False).encode("utf-8")
            self.pending.append(Job(next(self.job_ids), request, part, payload, len(chunk),
                                    bool(header.get("is_tokenized"))))
        self.pending_sentences += len(texts)
        log.debug("request %d from %s: %d sentences in %d jobs", request.request_id, client[:12].hex(),
                  len(texts), len(chunks))

    @staticmethod
    def reply(socket: zmq.Socket, client: bytes, frames: list) -> None:
        try:
            socket.send_multipart([client, *frames], copy=False)
        except zmq.ZMQError as e:  # the client went away; nothing else to do
            log.debug("reply to %s dropped: %s", client[:12].hex(), e)

    def fail(self, request: Request, code: str, message: str) -> None:
        if request.finished:
            return
        request.finished = True
        self.stats["errors"] += 1
        self.reply(request.socket, request.client, pack_error(request.request_id, code, message))

    # ------------------------------------------------------------ workers

    def dispatch(self) -> None:
        """Give queued jobs to ready workers, least loaded first; drop jobs nobody waits for."""
        while self.pending:
            job = self.pending[0]
            if job.request.finished or self.expired(job.request):
                self.pending.popleft()
                self.pending_sentences -= job.size
                if not job.request.finished:
                    self.stats["timeouts_dropped"] += 1
                    self.fail(job.request, ERR_TIMEOUT, "the client's timeout passed while the request was queued")
                continue
            slot = self.least_loaded()
            if slot is None:
                return
            self.pending.popleft()
            self.pending_sentences -= job.size
            slot.in_flight[job.job_id] = job
            job.request.dispatched = job.request.dispatched or time.monotonic()
            header = {"job": job.job_id, "deadline": job.request.deadline, "is_tokenized": job.is_tokenized,
                      "show_tokens": job.request.show_tokens}
            self.backend.send_multipart([slot.identity, P.JOB, P.dumps(header), job.payload], copy=False)

    def least_loaded(self) -> WorkerSlot | None:
        free = [s for s in self.slots if s.ready and len(s.in_flight) < P.WORKER_PREFETCH_JOBS]
        return min(free, key=lambda s: (s.load, len(s.in_flight)), default=None)

    @staticmethod
    def expired(request: Request) -> bool:
        return request.deadline is not None and time.time() > request.deadline

    def on_worker_message(self, frames: list) -> None:
        try:
            self.handle_worker_message(frames)
        except Exception:  # workers are ours, but a bug in handling one message must not stop serving
            log.exception("unexpected error on a message from a worker")

    def handle_worker_message(self, frames: list) -> None:
        identity, command = frames[0].bytes, frames[1].bytes
        slot = self.by_identity.get(identity)
        if slot is None or slot.identity != identity:
            return  # a message from a worker already declared dead
        slot.last_seen = time.monotonic()
        if command == P.RESULT:
            self.on_result(slot, P.loads(frames[2].bytes), frames[3] if len(frames) > 3 else None)
        elif command == P.READY:
            self.mark_ready(slot, P.loads(frames[2].bytes))
            slot.quick_deaths = 0
            if slot.restarts:
                log.info("worker %d is back (pid %s)", slot.index, slot.info.get("pid"))
        elif command == P.FAILED:
            message = P.loads(frames[2].bytes).get("message", "worker failed to start")
            slot.info["failure"] = message  # the reason start-up stops with, when it is the first load
            log.error("worker %d could not load the model: %s", slot.index, message)

    def on_result(self, slot: WorkerSlot, header: dict, data: zmq.Frame | None) -> None:
        job = slot.in_flight.pop(header.get("job"), None)
        if job is None:
            return
        slot.jobs_done += 1
        slot.sentences_done += job.size
        request = job.request
        if request.finished:
            return
        if not header.get("ok"):
            self.fail(request, header.get("error", ERR_SERVER), header.get("message", "encoding failed"))
            return
        request.parts[job.part] = (header["shape"], data, header.get("tokens"))
        request.n_tokens += header.get("n_tokens", 0)
        request.compute_ms += header.get("compute_ms", 0.0)
        request.done += 1
        if request.done == request.n_jobs:
            self.complete(request, header["dtype"])

    def complete(self, request: Request, dtype: str) -> None:
        request.finished = True
        shapes = [part[0] for part in request.parts]
        buffers = [part[1] for part in request.parts]
        tokens = [t for part in request.parts for t in part[2]] if request.show_tokens else None
        self.reply(request.socket, request.client,
                   pack_vectors(request.request_id, dtype, shapes, buffers, tokens, request.n_tokens))
        self.stats["requests"] += 1
        self.stats["sentences"] += request.sentences
        self.metrics.observe(request.received, request.dispatched, request.compute_ms, request.n_tokens)
        log.debug("request %d: %d sentences in %.1f ms", request.request_id, request.sentences,
                  (time.monotonic() - request.received) * 1000)

    def send_heartbeats(self) -> None:
        for slot in self.slots:
            if slot.ready:
                self.backend.send_multipart([slot.identity, P.HEARTBEAT])

    def check_workers(self, now: float) -> None:
        """Replace workers that exited or fell silent; re-queue what they held."""
        for slot in self.slots:
            if slot.respawn_at is not None:
                if now >= slot.respawn_at:
                    self.spawn(slot)
                continue
            exitcode = slot.process.exitcode
            silent = now - slot.last_seen > P.HEARTBEAT_INTERVAL * P.HEARTBEAT_LIVENESS
            # A loading worker sends no heartbeats; give it the start-up timeout instead.
            if exitcode is None and (not silent or (not slot.ready and now - slot.started < self.config.startup_timeout)):
                continue
            reason = f"exited with code {exitcode}" if exitcode is not None else \
                f"sent no heartbeat for {now - slot.last_seen:.1f} s"
            self.bury(slot, reason, now)

    def bury(self, slot: WorkerSlot, reason: str, now: float) -> None:
        log.error("worker %d (pid %s) %s; %d jobs go back to the queue", slot.index, slot.process.pid,
                  reason, len(slot.in_flight))
        if slot.process.exitcode is None:
            slot.process.kill()
        slot.process.join(timeout=5)
        self.by_identity.pop(slot.identity, None)
        for job in sorted(slot.in_flight.values(), key=lambda j: j.job_id, reverse=True):
            job.attempts += 1
            if job.attempts >= P.MAX_JOB_ATTEMPTS:
                self.fail(job.request, ERR_SERVER,
                          f"this request was on {job.attempts} workers that died while encoding it; "
                          "it is not retried again")
            elif not job.request.finished:
                self.pending.appendleft(job)
                self.pending_sentences += job.size
        slot.in_flight = {}
        slot.ready = False
        slot.restarts += 1
        self.stats["worker_restarts"] += 1
        quick = now - slot.started < 30
        slot.quick_deaths = slot.quick_deaths + 1 if quick else 0
        delay = min(P.RESPAWN_BACKOFF_MAX, 2.0 ** (slot.quick_deaths - 1)) if slot.quick_deaths > 1 else 0.0
        slot.respawn_at = now + delay
        if delay:
            log.warning("worker %d keeps dying; next start in %.0f s", slot.index, delay)

    # ------------------------------------------------------------ introspection

    def describe(self) -> dict:
        return {**self.config.public(), **self.encoder_info, "protocol_version": 1,
                "server_pid": os.getpid(), "started": self.started}

    def status(self) -> dict:
        workers = [{"index": s.index, "pid": s.process.pid if s.process else None, "ready": s.ready,
                    "device": s.info.get("device"), "jobs_in_flight": len(s.in_flight), "restarts": s.restarts,
                    "jobs_done": s.jobs_done, "sentences_done": s.sentences_done}
                   for s in self.slots]
        return {"uptime": time.time() - self.started, "workers": workers, "starting": self.starting,
                "workers_ready": sum(s.ready for s in self.slots), "queued_sentences": self.pending_sentences,
                "queued_jobs": len(self.pending), "doors": self.doors.status(), **self.stats,
                "peers_turned_away": self.handshakes.total if self.handshakes else 0,
                "metrics": self.metrics.snapshot()}

    # ------------------------------------------------------------ shutdown

    def shutdown(self) -> None:
        """Fail queued work at once, give jobs on workers a bounded grace to finish (answering new
        requests with "shutting down" meanwhile), fail what is left, and stop every worker."""
        log.info("shutting down: %d jobs in flight, %d queued", sum(len(s.in_flight) for s in self.slots),
                 len(self.pending))
        if self.frontend is not None:
            self.fail_jobs(list(self.pending), "the server shut down before this request was encoded")
            self.pending.clear()
            self.pending_sentences = 0
            poller = zmq.Poller()
            for socket in (self.backend, self.frontend, self.door_socket):
                if socket is not None:
                    poller.register(socket, zmq.POLLIN)
            deadline = time.monotonic() + SHUTDOWN_GRACE
            while any(s.in_flight for s in self.slots) and time.monotonic() < deadline:
                events = dict(poller.poll(100))
                if self.backend in events:
                    self.drain(self.backend, self.on_worker_message)
                for socket in (self.frontend, self.door_socket):
                    if socket in events:
                        self.drain(socket, lambda frames, s=socket: self.on_client_message(s, frames))
                for slot in self.slots:
                    if slot.in_flight and slot.process.exitcode is not None:  # died: no replacement now
                        self.fail_jobs(list(slot.in_flight.values()), "a worker died while the server shut down")
                        slot.in_flight = {}
            self.fail_jobs([j for s in self.slots for j in s.in_flight.values()],
                           f"the server shut down; encoding did not finish within {SHUTDOWN_GRACE:.0f} s")
        self.doors.stop()
        self.stop_workers()
        if self.authenticator is not None:
            self.authenticator.stop()
        if self.handshakes is not None:
            self.handshakes.close()
        for socket in (self.frontend, self.door_socket, self.backend):
            if socket is not None:
                socket.close(linger=0)
        self.context.term()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        log.info("stopped")

    def fail_jobs(self, jobs: list[Job], message: str) -> None:
        for job in jobs:
            self.fail(job.request, ERR_UNAVAILABLE, message)

    def stop_workers(self) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.exitcode is None and slot.ready:
                self.backend.send_multipart([slot.identity, P.STOP])
        deadline = time.monotonic() + 5
        for slot in self.slots:
            if slot.process is None:
                continue
            slot.process.join(timeout=max(0.1, deadline - time.monotonic()))
            if slot.process.exitcode is None:
                slot.process.terminate()
                slot.process.join(timeout=2)
            if slot.process.exitcode is None:
                slot.process.kill()
                slot.process.join(timeout=2)


def _peek_id(frames: list[bytes]) -> Any:
    """The request id, if the header is readable at all, so even an error reply can be matched."""
    try:
        value = json.loads(frames[0]).get("id")
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    except Exception:
        return None

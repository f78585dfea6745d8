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
import secrets
import shutil
import socket as socketlib
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
from .backend import LogLimiter, WorkerPort, capacity_of, ready_is_from_spawned
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
    socket: Any = None        # the back end it is reached on: the local ipc one, or the worker port
    host: str = ""            # where it runs; workers of other hosts also have `remote` set
    remote: bool = False
    capacity: int = P.WORKER_PREFETCH_JOBS   # jobs it asked to hold at once (READY)
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

    @property
    def name(self) -> str:
        """How logs name it: its index here, host/index for a worker of another host."""
        return f"{self.host}/{self.index}" if self.remote else str(self.index)

    @property
    def pid(self) -> int | None:
        return self.info.get("pid") if self.remote else (self.process.pid if self.process else None)


class Broker:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.context = zmq.Context()
        # Sockets only this user can reach live in a folder of mode 0700 (mkdtemp's).
        self.runtime_dir = tempfile.mkdtemp(prefix="bert-serving-")
        self.backend = self.context.socket(zmq.ROUTER)
        self.backend.setsockopt(zmq.LINGER, 0)
        self.backend_address = self._bind_backend()
        self.strangers = LogLimiter(log)  # messages from identities this broker did not spawn
        self.frontend: zmq.Socket | None = None
        self.handshakes: HandshakeWatch | None = None
        self.door_address = f"ipc://{self.runtime_dir}/doors"
        self.door_socket: zmq.Socket | None = None
        self.doors = Doors(config, self.door_address)
        self.authenticator = None
        self.slots = [WorkerSlot(index=i) for i in range(config.num_worker)]
        self.worker_port: WorkerPort | None = None   # workers of other hosts, with -worker_port
        self.remote_slots: list[WorkerSlot] = []
        self.hostname = socketlib.gethostname()
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
        """The local workers' socket: `ipc://` in the 0700 runtime folder, so no other user can
        connect (a TCP port on 127.0.0.1 is open to every local process)."""
        address = f"ipc://{self.runtime_dir}/workers"
        self.backend.bind(address)
        return address

    # ------------------------------------------------------------ start-up

    def start(self) -> None:
        """Open the client port and the door socket, start the doors, then the workers. Returns at
        once: the workers load the model while `serve_forever` already answers clients."""
        self.open_frontend()
        if self.config.worker_port is not None:
            self.worker_port = WorkerPort(self.context, self.config, self.authenticator)
        self.open_door_socket()
        self.doors.start()
        for slot in self.slots:
            self.spawn(slot)
        self.startup_deadline = time.monotonic() + self.config.startup_timeout

    def spawn(self, slot: WorkerSlot) -> None:
        slot.generation += 1
        # Drawn at random and handed only to the process spawned: a peer that finds the socket
        # cannot guess which identity the broker will accept READY from.
        slot.identity = secrets.token_hex(16).encode()
        slot.socket, slot.host = self.backend, self.hostname
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
        slot.capacity = capacity_of(info)
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
        remote = self.worker_port.socket if self.worker_port else None
        if remote is not None:
            poller.register(remote, zmq.POLLIN)
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
            if remote is not None and remote in events:
                self.drain(remote, self.on_remote_message)
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
            slot.socket.send_multipart([slot.identity, P.JOB, P.dumps(header), job.payload], copy=False)

    def least_loaded(self) -> WorkerSlot | None:
        """The ready worker with the least work for the jobs it asked to hold (READY's capacity)."""
        free = [s for s in self.workers() if s.ready and len(s.in_flight) < s.capacity]
        return min(free, key=lambda s: (len(s.in_flight) / s.capacity, s.load), default=None)

    def workers(self) -> list[WorkerSlot]:
        """Every worker: this host's, then those of other hosts that joined."""
        return self.slots + self.remote_slots

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
        if slot is None or slot.identity != identity or slot.remote:  # remote ones speak on the worker port
            # A worker already declared dead says anything; a stranger's READY is worth a warning.
            if command == P.READY:
                self.strangers.warning("ignored READY from identity %r: not a worker this broker spawned",
                                       identity[:40])
            return
        if command == P.READY:
            info = P.loads(frames[2].bytes)
            if not ready_is_from_spawned(info, slot.process.pid):
                self.strangers.warning("ignored READY for worker %d from pid %r: the broker spawned pid %s",
                                       slot.index, info.get("pid") if isinstance(info, dict) else None,
                                       slot.process.pid)
                return
        slot.last_seen = time.monotonic()
        if command == P.RESULT:
            self.on_result(slot, P.loads(frames[2].bytes), frames[3] if len(frames) > 3 else None)
        elif command == P.READY:
            self.mark_ready(slot, info)
            slot.quick_deaths = 0
            if slot.restarts:
                log.info("worker %d is back (pid %s)", slot.index, slot.info.get("pid"))
        elif command == P.FAILED:
            message = P.loads(frames[2].bytes).get("message", "worker failed to start")
            slot.info["failure"] = message  # the reason start-up stops with, when it is the first load
            log.error("worker %d could not load the model: %s", slot.index, message)

    def on_remote_message(self, frames: list) -> None:
        try:
            self.handle_remote_message(frames)
        except Exception:  # whatever a peer on the network sends, serving goes on
            log.exception("unexpected error on a message from the worker port")

    def handle_remote_message(self, frames: list) -> None:
        """A worker of another host: HELLO is answered WELCOME or REFUSED, then it is served like a
        local worker. A routing id the head does not know (it restarted, or gave that worker up for
        silent) is told STOP, after which its worker says HELLO again."""
        if len(frames) < 2:
            return
        identity, command = frames[0].bytes, frames[1].bytes
        slot = self.by_identity.get(identity)
        if slot is not None and not slot.remote:  # a local worker's identity, said over the network
            slot = None
        if command == P.HELLO:
            if identity in self.by_identity and slot is None:
                return  # a local worker's identity: not to be taken over from the network
            if slot is not None:
                self.bury(slot, "said HELLO again (its connection to the head restarted)", time.monotonic())
            self.on_hello(identity, frames)
        elif slot is None:
            self.worker_port.socket.send_multipart([identity, P.STOP])
        elif command == P.READY:
            info = _json_object(frames[2].bytes if len(frames) > 2 else b"")
            # pid and address as the head first saw them: a worker does not rename itself later
            self.mark_ready(slot, {**info, "pid": slot.info.get("pid"), "address": slot.info.get("address")})
            log.info("worker %s (pid %s) of another host joined: %s, %d jobs in hand", slot.name, slot.pid,
                     slot.info.get("device"), slot.capacity)
        elif command == P.FAILED:
            message = _json_object(frames[2].bytes if len(frames) > 2 else b"").get("message")
            self.bury(slot, f"could not load the model: {message}", time.monotonic())
        else:
            slot.last_seen = time.monotonic()
            if command == P.RESULT and len(frames) > 2:
                self.on_result(slot, _json_object(frames[2].bytes), frames[3] if len(frames) > 3 else None)

    def on_hello(self, identity: bytes, frames: list) -> None:
        hello = _json_object(frames[2].bytes if len(frames) > 2 else b"")
        host = str(hello.get("host", "?"))[:64]
        command, body = self.worker_port.answer_hello(hello)
        if command == P.WELCOME and len(self.remote_slots) >= P.MAX_REMOTE_WORKERS:
            command, body = P.REFUSED, {"message": f"this head takes at most {P.MAX_REMOTE_WORKERS} workers of other hosts"}
        if command == P.REFUSED:
            self.worker_port.refusals.warning("refused a worker of host %r: %s", host, body["message"])
            self.worker_port.socket.send_multipart([identity, P.REFUSED, P.dumps(body)])
            return
        now = time.monotonic()
        index, restarts, pid = (hello.get(k) for k in ("index", "restarts", "pid"))
        slot = WorkerSlot(index=index if isinstance(index, int) else 0, identity=identity, socket=self.worker_port.socket,
                          host=host, remote=True, started=now, last_seen=now,
                          restarts=restarts if isinstance(restarts, int) else 0,
                          info={"pid": pid if isinstance(pid, int) else None, "address": _peer_address(frames[1])})
        self.remote_slots.append(slot)
        self.by_identity[identity] = slot
        self.worker_port.socket.send_multipart([identity, P.WELCOME, P.dumps(body)])
        log.info("worker %s (pid %s) of another host from %s: same model, loading it", slot.name, slot.pid,
                 slot.info["address"])

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
        for slot in self.workers():
            if slot.ready:
                slot.socket.send_multipart([slot.identity, P.HEARTBEAT])

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
        for slot in list(self.remote_slots):  # they heartbeat while loading the model too
            if now - slot.last_seen > P.HEARTBEAT_INTERVAL * P.HEARTBEAT_LIVENESS:
                self.bury(slot, f"sent no heartbeat for {now - slot.last_seen:.1f} s", now)

    def bury(self, slot: WorkerSlot, reason: str, now: float) -> None:
        log.error("worker %s (pid %s) %s; %d jobs go back to the queue", slot.name, slot.pid,
                  reason, len(slot.in_flight))
        if slot.process is not None and slot.process.exitcode is None:
            slot.process.kill()
        if slot.process is not None:
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
        if slot.remote:  # its host restarts it, or it says HELLO again: a new slot then
            self.remote_slots.remove(slot)
            return
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
        workers = [{"index": s.index, "host": s.host, "remote": s.remote, "address": s.info.get("address"),
                    "pid": s.pid, "ready": s.ready,
                    "device": s.info.get("device"), "capacity": s.capacity, "jobs_in_flight": len(s.in_flight),
                    "restarts": s.restarts, "jobs_done": s.jobs_done, "sentences_done": s.sentences_done}
                   for s in self.workers()]
        ready = sum(s.ready for s in self.workers())
        return {"uptime": time.time() - self.started, "workers": workers, "starting": self.starting,
                "workers_ready": ready, "not_ready_because": None if ready else self.why_no_worker(),
                "queued_sentences": self.pending_sentences,
                "queued_jobs": len(self.pending), "doors": self.doors.status(), **self.stats,
                "peers_turned_away": self.handshakes.total if self.handshakes else 0,
                "metrics": self.metrics.snapshot()}

    def why_no_worker(self) -> str:
        """Why no worker is ready, for `server_status()` (and `/health`)."""
        if self.slots and self.starting:
            return "the workers are loading the model"
        if self.worker_port is not None and not self.slots:
            joining = len(self.remote_slots)
            return (f"no worker host has joined on {self.worker_port.address} yet" if not joining else
                    f"{joining} workers of other hosts are loading the model")
        return "every worker died; replacements are starting"

    # ------------------------------------------------------------ shutdown

    def shutdown(self) -> None:
        """Fail queued work at once, give jobs on workers a bounded grace to finish (answering new
        requests with "shutting down" meanwhile), fail what is left, and stop every worker."""
        log.info("shutting down: %d jobs in flight, %d queued", sum(len(s.in_flight) for s in self.workers()),
                 len(self.pending))
        if self.frontend is not None:
            self.fail_jobs(list(self.pending), "the server shut down before this request was encoded")
            self.pending.clear()
            self.pending_sentences = 0
            poller = zmq.Poller()
            for socket in (self.backend, self.frontend, self.door_socket):
                if socket is not None:
                    poller.register(socket, zmq.POLLIN)
            remote = self.worker_port.socket if self.worker_port else None
            if remote is not None:
                poller.register(remote, zmq.POLLIN)
            deadline = time.monotonic() + SHUTDOWN_GRACE
            while any(s.in_flight for s in self.workers()) and time.monotonic() < deadline:
                events = dict(poller.poll(100))
                if self.backend in events:
                    self.drain(self.backend, self.on_worker_message)
                if remote is not None and remote in events:
                    self.drain(remote, self.on_remote_message)
                for socket in (self.frontend, self.door_socket):
                    if socket in events:
                        self.drain(socket, lambda frames, s=socket: self.on_client_message(s, frames))
                for slot in self.slots:
                    if slot.in_flight and slot.process.exitcode is not None:  # died: no replacement now
                        self.fail_jobs(list(slot.in_flight.values()), "a worker died while the server shut down")
                        slot.in_flight = {}
            self.fail_jobs([j for s in self.workers() for j in s.in_flight.values()],
                           f"the server shut down; encoding did not finish within {SHUTDOWN_GRACE:.0f} s")
        self.doors.stop()
        self.stop_workers()
        if self.worker_port is not None:
            self.worker_port.close()
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
        """Stop this host's workers; those of other hosts are told STOP too, and wait for a head."""
        for slot in self.remote_slots:
            slot.socket.send_multipart([slot.identity, P.STOP])
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


def _json_object(frame: bytes) -> dict:
    """A JSON object from a peer on the network; {} for anything else."""
    try:
        value = json.loads(frame)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _peer_address(frame: zmq.Frame) -> str | None:
    """The TCP peer's address, as libzmq saw the connection."""
    try:
        return frame.get("Peer-Address")
    except (zmq.ZMQError, AttributeError):
        return None

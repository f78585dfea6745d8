"""The broker: clients' requests in, mini-batches out to worker processes, replies back in order.

One thread, one poll loop over four ROUTER sockets and the workers' links:

    clients (DEALER) --> front end ROUTER ----[split into jobs]--> links (Unix sockets) --> workers
    doors (HTTP, ...) --> door ROUTER (ipc) --/        |
                              intake ROUTER (ipc) <-> intake process (reads big requests)

- The loop serves from the start: the client port and the doors open before the workers have
  loaded the model, requests wait in the queue meanwhile, and `server_status()` says how many
  workers are ready. The "ready" callback runs once every worker has loaded the model; a worker
  that cannot load it stops the server.

- No message can stall the loop: frame sizes are checked before any content is read, the header
  is small, and a texts frame over a few KB is parsed, checked and split by the intake process
  (`service/intake.py`). Reading a socket is bounded in messages and in time.
- Admission, queue order, expiry and retries are `service/scheduler.py` (plain code, no sockets):
  per-client limits, the queue bounded in sentences and estimated tokens, fair turns by tokens
  across clients (a door's requests by the user it names), deadlines on the monotonic clock.
- A job goes to the ready worker with the least work in hand, each holding at most
  `WORKER_PREFETCH_JOBS`, so a worker always has the next job while it computes the current one.
- Replies wait for a client that does not read them only up to `-max_unread_replies` in its pipe
  (the client port's send high-water mark) plus OUTBOX_BYTES held back in the broker (so a burst
  of replies to a client that does read is not lost); the rest are dropped, counted in
  `server_status()` and logged.
  A client that disconnects (seen by the socket monitor) has its queued work dropped, and so has a
  request its client cancels (the HTTP door does for a client that disconnected).
- Workers' replies are kept as raw frames and forwarded to the client once every job of its request
  is back: the broker never decodes a vector.
- A worker that exits or stops sending heartbeats is replaced; its jobs go back to the head of the
  queue, and a job that was on `MAX_JOB_ATTEMPTS` dying workers fails its request instead.
"""
from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import shutil
import socket as socketlib
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import protocol as P
from .client import (ERR_BAD_REQUEST, ERR_BUSY, ERR_SERVER, ERR_TIMEOUT, ERR_UNAVAILABLE, BadRequestError,
                     pack_error, pack_result, pack_vectors, unpack_header)
from .config import ServerConfig
from .backend import LogLimiter, WorkerPort, capacity_of, ready_is_from_spawned
from .doors import Doors
from .errors import StartupError
from .handshakes import EVENTS as HANDSHAKE_EVENTS, HandshakeWatch
from .intake import INLINE_PARSE_BYTES, MAX_HEADER_BYTES, IntakeProcess, check_sizes, peek_id, prepare
from .link import POLLIN, POLLOUT, BrokerSide, LinkClosed, LinkListener, poll_key
from .metrics import RequestMetrics
from .scheduler import DEFAULT_MAX_SEQ_LEN, Job, Limits, Request, Scheduler
from .worker import worker_main
from .v1door import V1_DOOR_ID
from .zmtp import ZmtpRouter

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 10.0  # seconds in-flight requests get to finish on SIGINT/SIGTERM
POLL_MS = 250          # the loop wakes at least this often
DRAIN_MESSAGES = 1000  # read at most this many messages from one socket per turn...
DRAIN_SECONDS = 0.05   # ...and for at most this long, so no socket starves the others
EXPIRE_INTERVAL = 0.5  # seconds between sweeps of the queue for requests past their deadline
# Seconds between looks at the worker, door and intake processes (an exit code is a system call per
# process): at every turn they cost ~20 us of each one-sentence query's ~0.4 ms of broker CPU (issue 13).
PROCESS_CHECK_INTERVAL = 0.02
DROP_LOG_INTERVAL = 10.0  # seconds between log lines about dropped replies
OUTBOX_BYTES = 16 * 1024 * 1024  # replies held in the broker for one client whose pipe is full
OUTBOX_POLL_MS = 20    # how often replies held back are retried
MAX_ECHO_CHARS = 4096  # a door's note returned with a reply
# Doors that connect under a fixed routing id, so that one restarted gets its predecessor's replies.
RECONNECTING_DOORS = frozenset({V1_DOOR_ID})

__all__ = ["Broker", "StartupError"]


@dataclass(eq=False)
class Outbox:
    """Replies to one client that its pipe had no room for yet, in order."""

    replies: deque = field(default_factory=deque)
    size: int = 0


@dataclass(eq=False)
class WorkerSlot:
    """One worker process the broker keeps alive: its current incarnation and what it holds."""

    index: int
    generation: int = 0
    process: Any = None
    identity: bytes = b""     # a worker of another host: its routing id on the worker port
    socket: Any = None        # a worker of another host: the worker port
    link: BrokerSide | None = None  # a local worker: its link, once it connected
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

    def room(self) -> tuple[bool, bool]:
        """(bulk, query): whether this worker may be given a bulk job, and a query. Its capacity
        counts bulk jobs only: four clients sending one sentence back to back kept a CPU worker's two
        places full of queries, and a 2,000-sentence request beside them moved one job a minute. A
        query is taken while fewer than `capacity` jobs of any kind are in hand, or when none of
        them is a query, so a worker busy with bulk work takes one more, which it encodes beside or
        between that work's forward passes (service/worker.py) instead of after it."""
        if not self.ready:
            return False, False
        queries = sum(1 for job in self.in_flight.values() if job.is_query)
        return len(self.in_flight) - queries < self.capacity, len(self.in_flight) < self.capacity or queries == 0

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
        self.backend_address = f"{self.runtime_dir}/workers"
        self.listener = LinkListener(self.backend_address)  # the local workers' links
        self.strangers = LogLimiter(log)  # connections to it from processes this broker did not spawn
        # A peer can send bad or refused requests as fast as the loop reads them: a line per 10 s of each.
        self.bad_request_log, self.busy_log = LogLimiter(log), LogLimiter(log)
        self.poller: zmq.Poller | None = None
        self.listener_key: Any = None              # the sources `watch` polls, as the poll names them
        self.client_sockets: list[tuple[Any, Any]] = []
        self.frontend: zmq.Socket | ZmtpRouter | None = None  # the client port (see open_frontend)
        self.reader: ZmtpRouter | None = None  # the same, when it is the broker's own ZMTP reader
        self.handshakes: HandshakeWatch | None = None
        self.door_address = f"ipc://{self.runtime_dir}/doors"
        self.door_socket: zmq.Socket | None = None
        self.doors = Doors(config, self.door_address)
        self.authenticator = None
        self.slots = [WorkerSlot(index=i) for i in range(config.num_worker)]
        self.worker_port: WorkerPort | None = None   # workers of other hosts, with -worker_port
        self.remote_slots: list[WorkerSlot] = []
        self.hostname = socketlib.gethostname()
        self.by_identity: dict[bytes, WorkerSlot] = {}  # workers of other hosts, by routing id
        self.scheduler = Scheduler(Limits.from_config(config))
        self.intake: IntakeProcess | None = None
        self.monitor: zmq.Socket | None = None
        self.peers: dict[int, bytes] = {}     # front-end connection fd -> the client's routing id
        self.owed_disconnects: dict[int, int] = {}  # fds whose closing was seen before the monitor said so
        self.next_expiry = 0.0
        self.last_drop_log = 0.0
        self.outboxes: dict[tuple[zmq.Socket, bytes], Outbox] = {}
        self.encoder_info: dict = {}
        self.stats = {"requests": 0, "sentences": 0, "errors": 0, "busy": 0, "bad_requests": 0,
                      "worker_restarts": 0, "timeouts_dropped": 0, "replies_dropped_unread": 0,
                      "disconnected_dropped": 0, "cancelled_dropped": 0, "loop_max_ms": 0.0}
        self.metrics = RequestMetrics()  # latency histograms and tokens, observed in complete()
        self.started = time.time()
        self.stop_requested = False
        self.starting = True          # until every worker has loaded the model once
        self.startup_deadline = 0.0
        self.exit_code = 0
        self._mp = multiprocessing.get_context("spawn")

    # ------------------------------------------------------------ start-up

    def start(self) -> None:
        """Open the client port and the door socket, start the doors, then the workers. Returns at
        once: the workers load the model while `serve_forever` already answers clients."""
        self.open_frontend()
        if self.config.worker_port is not None:
            self.worker_port = WorkerPort(self.context, self.config, self.authenticator)
        if self.doors.doors:  # else unused: a ZeroMQ socket in the poll costs system calls at every turn
            self.open_door_socket()
        self.intake = IntakeProcess(self.context, self.runtime_dir, self.config.max_request_bytes, self.config.verbose,
                                    self._mp, self.on_intake_done)
        self.intake.start()
        self.doors.start()
        for slot in self.slots:
            self.spawn(slot)
        self.startup_deadline = time.monotonic() + self.config.startup_timeout

    def spawn(self, slot: WorkerSlot) -> None:
        slot.generation += 1
        self.close_link(slot)
        slot.host = self.hostname
        slot.ready, slot.in_flight, slot.info, slot.respawn_at = False, {}, {}, None
        slot.started = slot.last_seen = time.monotonic()
        slot.process = self._mp.Process(
            target=worker_main, name=f"worker-{slot.index}", daemon=True,
            args=(self.config, slot.index, self.backend_address, os.getpid()))
        slot.process.start()
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
        # A restarted door connects under its old routing id and takes over its replies (only our own
        # processes reach this socket); a full or absent door raises instead of dropping a reply.
        self.door_socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.door_socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.door_socket.setsockopt(zmq.MAXMSGSIZE, 4 * self.config.max_request_bytes)
        self.door_socket.bind(self.door_address)

    def open_frontend(self) -> None:
        """The client port: the broker's own ZMTP reader (service/zmtp.py: no I/O thread between a
        request and the broker), or with -auth_dir (CurveZMQ) or -zmq_client_port a libzmq ROUTER."""
        # With -auth_dir a failed handshake is the authenticator's to report (the 2019 client's shows as
        # "a client without CurveZMQ keys"); without, it is a wrong protocol.
        if not self.config.auth_dir:
            v1_ports = (self.config.v1_port, self.config.v1_port_out) if self.config.v1_port else None
            self.handshakes = HandshakeWatch(self.config.port, v1_ports)
        if not (self.config.auth_dir or self.config.zmq_client_port):
            try:
                # Caps as the libzmq socket's below: a frame over 4x the polite limit drops the
                # connection; -max_unread_replies replies unsent, and more wait in the broker's outbox.
                # And one libzmq lacks: messages not yet whole hold 4x the polite limit at most, all
                # clients together: several large requests at once (each arrives in well under a
                # second at loopback speed), twice what may wait for the intake process before it
                # says "busy" anyway.
                self.frontend = self.reader = ZmtpRouter(
                    self.config.host, self.config.port, 4 * self.config.max_request_bytes,
                    self.config.max_unread_replies, on_refused=lambda reason: self.handshakes.note(time.monotonic()),
                    max_buffered=4 * self.config.max_request_bytes)
                return
            except socketlib.gaierror:  # not an address or a host name: libzmq also takes interface names
                log.info("-host %s is not an address; the client port uses a libzmq socket", self.config.host)
            except OSError as e:
                raise StartupError(f"cannot listen on tcp://{self.config.host}:{self.config.port}: {e}") from None
        self.open_zmq_frontend()

    def open_zmq_frontend(self) -> None:
        self.frontend = self.context.socket(zmq.ROUTER)
        self.frontend.setsockopt(zmq.LINGER, 0)
        # A hard cap on one frame above the polite limit (up to which the client gets a clear error):
        # a bigger frame drops the connection before it uses memory. ZeroMQ has no cap on a whole
        # message: the sum of its frames is checked on receipt, before any content is read.
        self.frontend.setsockopt(zmq.MAXMSGSIZE, 4 * self.config.max_request_bytes)
        # Replies a client does not read wait in its pipe up to this many; then sends fail at once
        # (ROUTER_MANDATORY) instead of piling up, and the broker counts the drop.
        self.frontend.setsockopt(zmq.SNDHWM, self.config.max_unread_replies)
        self.frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A socket has one monitor, read here for three things: a closed connection is the only sign
        # that a client left (ROUTER_NOTIFY is a draft API: the monitor tells its fd, and each message's
        # fd tells whose it was); handshakes refused for a wrong protocol (service/handshakes.py); and,
        # with -auth_dir, for missing or unlisted keys (service/auth.py's RefusalLog).
        self.monitor = self.frontend.get_monitor_socket(zmq.EVENT_DISCONNECTED | HANDSHAKE_EVENTS)
        if self.config.auth_dir:
            from .auth import start_authenticator
            self.authenticator = start_authenticator(self.context, self.frontend, self.config.auth_dir)
        address = f"tcp://{self.config.host}:{self.config.port}"
        try:
            self.frontend.bind(address)
        except zmq.ZMQError as e:
            raise StartupError(f"cannot listen on {address}: {e}") from None

    # ------------------------------------------------------------ the loop

    def serve_forever(self, on_ready=None) -> None:
        """Serve until `stop_requested` is set (by a signal handler, or a failed start), then shut
        down cleanly. `on_ready()` is called once, when every worker has loaded the model."""
        self.watch(self.frontend, self.door_socket, self.intake.polled, self.monitor,
                   self.worker_port.socket if self.worker_port else None)
        next_heartbeat = next_process_check = 0.0
        while not self.stop_requested:
            before_poll = time.monotonic()
            events = dict(self.poller.poll(self.poll_timeout_ms()))
            woke = time.monotonic()
            self.forgive_own_stall(woke - before_poll - POLL_MS / 1000)  # the poll itself came back late
            self.flush_outboxes()
            self.read_sockets(events)
            now = time.monotonic()
            self.forgive_own_stall(now - woke)
            if now >= next_heartbeat:
                self.send_heartbeats()
                if self.authenticator is not None:
                    self.authenticator.refusals.log_if_due(now)
                next_heartbeat = now + P.HEARTBEAT_INTERVAL
            if self.starting:
                if self.check_startup(now):
                    self.starting = False
                    gc.freeze()  # what start-up made lives on: a full collection no longer walks it (9 ms -> ~0)
                    if on_ready is not None:
                        on_ready()
            if now >= next_process_check:
                next_process_check = now + PROCESS_CHECK_INTERVAL
                self.check_processes(now)
            if now >= self.next_expiry:
                self.expire(now)
                if self.reader is not None:
                    self.reader.tick(now)
                self.next_expiry = now + EXPIRE_INTERVAL
            self.dispatch()
            self.poll_link_output()
            end = time.monotonic()
            self.forgive_own_stall(end - now)
            self.note_turn(end - woke)
        self.shutdown()

    def check_processes(self, now: float) -> None:
        """Replace the worker, door and intake processes that exited (workers also when silent)."""
        if not self.starting and not self.stop_requested:  # a signal during the poll: workers may have had it too
            self.check_workers(now)
            self.doors.check(now)
        self.intake.check()

    def watch(self, *sockets: Any) -> None:
        """Poll `sockets` (ZeroMQ sockets, or anything with a fileno(); None: not open), the local
        workers' listener and their links from now on."""
        self.poller = zmq.Poller()
        for socket in (*sockets, self.listener):
            if socket is not None:  # by its fd, or pyzmq would call its fileno() at every poll
                self.poller.register(poll_key(socket), POLLIN)
        for slot in self.slots:
            if slot.link is not None:
                slot.link.polled = 0
        self.poll_link_output()
        # What the poll names them by, found once rather than at every turn.
        self.listener_key = poll_key(self.listener) if self.listener is not None else None
        self.client_sockets = [(s, poll_key(s)) for s in (self.frontend, self.door_socket) if s is not None]

    def read_sockets(self, events: dict) -> None:
        # Disconnections first: a fd they free may already carry a new client's messages.
        if self.monitor in events:
            self.drain(self.monitor, self.on_monitor_event)
        self.read_links(events)
        if self.worker_port is not None and self.worker_port.socket in events:
            self.drain(self.worker_port.socket, self.on_remote_message)
        if self.intake.polled.has_message(self.intake.polled.fd in events):
            self.drain(self.intake.socket, self.intake.on_message)
        for socket, key in self.client_sockets:
            if key in events or socket is self.frontend and self.frontend_backlog():
                self.drain(socket, lambda frames, s=socket: self.on_client_message(s, frames))
        if self.reader is not None:
            for client in self.reader.take_departed():
                self.drop_client(client)

    def poll_timeout_ms(self) -> int:
        """How long the next poll may wait: not at all while messages already wait unseen by it (the
        client port's parsed backlog; an intake answer whose fd signal a send took, see PolledByFd:
        asked here, after the turn's last send), less while replies are held."""
        if self.frontend_backlog() or self.intake.polled.has_message():
            return 0
        return OUTBOX_POLL_MS if self.outboxes else POLL_MS

    def frontend_backlog(self) -> bool:
        """Whether the client port holds messages or bytes already read (a drain stops at its bound;
        the ZMTP reader's poll fd does not show what it has read and not handed over or parsed)."""
        return self.reader is not None and self.reader.has_backlog()

    @staticmethod
    def drain(socket: zmq.Socket, handler, limit: int = DRAIN_MESSAGES, seconds: float = DRAIN_SECONDS) -> None:
        """Handle what is waiting on `socket` without blocking, bounded in messages and in time so
        that no socket starves the others."""
        stop = time.monotonic() + seconds
        for _ in range(limit):
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handler(frames)
            # Asked, not tried: a failed receive raises, and building that exception costs more than
            # the question (most turns hold one message, so this is on every query's path).
            if time.monotonic() > stop or not socket.getsockopt(zmq.EVENTS) & POLLIN:
                return

    def forgive_own_stall(self, seconds: float) -> None:
        """Liveness is judged on messages read: for a span in which the broker itself was not
        reading (starved of CPU, stopped, or busy), its workers' silence is not theirs, so their
        clocks move on by as much. Their heartbeats sent meanwhile are read before the next check."""
        if seconds > P.HEARTBEAT_INTERVAL / 2:
            for slot in self.workers():
                slot.last_seen += seconds

    def note_turn(self, seconds: float) -> None:
        """The longest the loop went without polling (server_status()["loop_max_ms"])."""
        if seconds * 1000 > self.stats["loop_max_ms"]:
            self.stats["loop_max_ms"] = round(seconds * 1000, 1)

    # ------------------------------------------------------------ clients

    def on_client_message(self, socket: zmq.Socket, frames: list) -> None:
        client, body, enveloped = frames[0].bytes, frames[1:], False
        if socket is self.frontend:
            if self.monitor is not None:  # the ZMTP reader reports departures itself
                self.note_peer(frames[-1], client)
            if len(body) >= 2 and len(body[0]) == 0 and (body[1].bytes[:1] == b"{" or self.may_be_req(frames[0])):
                # A REQ socket's empty delimiter, then our request: answered as a REP socket would.
                # From a REQ socket whatever follows, or a bad header's error would go without the
                # delimiter, which the socket drops, and it could never send again. Per message, not
                # per client: a DEALER may send either kind (its garbage is answered plainly).
                enveloped, body = True, body[1:]
        try:
            self.handle_request(socket, client, body, enveloped)
        except Exception as e:  # a safety net: no message may take the broker down with it
            log.exception("unexpected error on a request from %s", client[:12].hex())
            # The request's id, so the client gets this error at once rather than a timeout.
            request_id = peek_id(body[0].bytes) if body and len(body[0]) <= MAX_HEADER_BYTES else None
            self.reply(socket, client, pack_error(request_id, ERR_SERVER, f"internal error: {type(e).__name__}: {e}"),
                       enveloped)

    @staticmethod
    def may_be_req(identity: zmq.Frame) -> bool:
        """Whether a client may be a REQ socket, by the Socket-Type its handshake declared (both
        client ports give it: libzmq's frames, and the ZMTP reader's id frames). A peer whose
        handshake declared none (ZMTP 2, on the libzmq port) may be."""
        try:
            return identity.get("Socket-Type") == "REQ"
        except zmq.ZMQError:
            return True

    def handle_request(self, socket: zmq.Socket, client: bytes, body: list[zmq.Frame],
                       enveloped: bool = False) -> None:
        """Check sizes, then the small header; answer config and status; open and queue an encode
        request (its texts parsed here when small, by the intake process otherwise). `enveloped`:
        it came from a REQ socket, whose replies start with an empty frame."""
        sizes = [len(frame) for frame in body]
        try:
            check_sizes(sizes, self.config.max_request_bytes)
            header = unpack_header(body[0].bytes, len(body))  # size checked first: at most MAX_HEADER_BYTES
        except BadRequestError as e:
            # The id, if the header is readable at all, so that even this error is matched to its request.
            request_id = peek_id(body[0].bytes) if body and sizes[0] <= MAX_HEADER_BYTES else None
            self.refuse(socket, client, request_id, e, enveloped)
            return
        request_id = header["id"]
        if header["cmd"] == "cancel" and enveloped:  # a REQ socket must hear back before it sends again
            self.reply(socket, client, pack_error(request_id, ERR_BAD_REQUEST, "cancel is for DEALER sockets: a REQ "
                                                  "socket's request is answered before it can send another"), enveloped)
        elif header["cmd"] == "cancel":  # never answered, not even while shutting down
            self.cancel(socket, client, request_id)
        elif self.stop_requested:
            self.reply(socket, client, pack_error(request_id, ERR_UNAVAILABLE, "the server is shutting down"), enveloped)
        elif header["cmd"] == "config":
            self.reply(socket, client, pack_result(request_id, self.describe()), enveloped)
        elif header["cmd"] == "status":
            self.reply(socket, client, pack_result(request_id, self.status()), enveloped)
        else:
            self.accept(socket, client, header, body[1], enveloped)

    def accept(self, socket: zmq.Socket, client: bytes, header: dict, texts: zmq.Frame,
               enveloped: bool = False) -> None:
        received = time.monotonic()
        request = Request(socket, client, self.tenant_of(socket, client, header), header["id"],
                          self.scheduler.deadline(header.get("timeout"), received),
                          bool(header.get("show_tokens")), bool(header.get("is_tokenized")), received=received,
                          echo=self.echo_of(socket, header), enveloped=enveloped)
        refusal = self.scheduler.open(request)
        if refusal is None and len(texts) > INLINE_PARSE_BYTES and not self.intake.has_room(len(texts)):
            self.scheduler.release(request)
            refusal = "server busy: too many large requests are being read; retry later"
        if refusal:
            self.busy(request, refusal)
            return
        options = {"is_tokenized": request.is_tokenized, "max_sentences": self.config.max_client_batch_size,
                   "max_batch_size": self.config.max_batch_size,
                   "max_seq_len": self.encoder_info.get("max_seq_len") or DEFAULT_MAX_SEQ_LEN}
        if len(texts) > INLINE_PARSE_BYTES:
            self.intake.submit(request, texts, options)
            return
        try:
            chunks = prepare(texts.buffer, options)
        except BadRequestError as e:
            self.scheduler.release(request)
            self.refuse(socket, client, request.request_id, e, enveloped)
            return
        self.queue(request, chunks)

    def on_intake_done(self, request: Request, chunks: list | None, error: str | None) -> None:
        """A request back from the intake process: queued, or refused with the reason."""
        if request.finished:  # its client left or cancelled it while it was being read: no reply
            self.scheduler.release(request)
        elif chunks is not None:
            self.queue(request, chunks)
        elif error is not None:
            self.scheduler.release(request)
            self.refuse(request.socket, request.client, request.request_id, BadRequestError(error), request.enveloped)
        else:
            self.fail(request, ERR_SERVER, "the server could not read this request (its intake process died)")

    def queue(self, request: Request, chunks: list) -> None:
        if request.finished:  # its client left while it was being read
            self.scheduler.release(request)
            return
        refusal = self.scheduler.enqueue(request, chunks)
        if refusal:
            self.busy(request, refusal)
            return
        log.debug("request %d from %s: %d sentences (about %d tokens) in %d jobs", request.request_id,
                  request.client[:12].hex(), request.sentences, request.tokens, request.n_jobs)
        # A worker with room gets it now, not at the end of this turn of the loop (~50 us of a
        # one-sentence request's latency); with no room, the jobs wait for the scheduler's fair order.
        self.dispatch()

    def tenant_of(self, socket: zmq.Socket, client: bytes, header: dict) -> tuple:
        """Whom fairness is owed to: the connection, or on the door socket only, the user the door
        names (anyone could put a tenant in a header sent to the client port)."""
        tenant = header.get("tenant")
        if socket is self.door_socket and isinstance(tenant, str) and tenant:
            return ("door", tenant[:200])
        return ("door" if socket is self.door_socket else "client", client)

    def echo_of(self, socket: zmq.Socket, header: dict) -> str | None:
        """What a door asked to have returned with the reply (the door socket only; a bounded string)."""
        echo = header.get("echo")
        return echo if socket is self.door_socket and isinstance(echo, str) and len(echo) <= MAX_ECHO_CHARS else None

    def refuse(self, socket: zmq.Socket, client: bytes, request_id: Any, error: BadRequestError,
               enveloped: bool = False) -> None:
        self.stats["bad_requests"] += 1
        self.bad_request_log.warning("bad request from %s: %s", client[:12].hex(), error)
        self.reply(socket, client, pack_error(request_id, ERR_BAD_REQUEST, str(error)), enveloped)

    def busy(self, request: Request, message: str) -> None:
        request.finished = True
        self.stats["busy"] += 1
        self.busy_log.warning("busy: refused request %s of %s: %s", request.request_id, self.named(request), message)
        self.reply(request.socket, request.client, pack_error(request.request_id, ERR_BUSY, message, request.echo),
                   request.enveloped)

    @staticmethod
    def named(request: Request) -> str:
        """Who a request is, for a log line: the user a door named ('v1:<identity>', 'http-user:<user>'),
        quoted as repr does (it is the peer's text), else the connection's routing id."""
        tenant = request.tenant
        if isinstance(tenant, tuple) and len(tenant) == 2 and isinstance(tenant[1], str):
            return repr(tenant[1][:64])
        return request.client[:12].hex()

    def reply(self, socket: zmq.Socket, client: bytes, frames: list, enveloped: bool = False) -> None:
        """Send without ever blocking. A reply the client's pipe has no room for (it holds
        -max_unread_replies) waits in the client's outbox, which holds at most OUTBOX_BYTES
        (and always one reply): past that the client is not reading, and the reply is dropped.
        `enveloped`: to a REQ socket's request, so it starts with the empty delimiter."""
        if enveloped:
            frames = [b"", *frames]
        box = self.outboxes.get((socket, client))
        if box is None:
            if self.send(socket, client, frames):
                return
            box = self.outboxes[(socket, client)] = Outbox()
        size = sum(len(frame) for frame in frames)
        if box.replies and box.size + size > OUTBOX_BYTES:
            self.count_drop(client)
            return
        box.replies.append(frames)
        box.size += size

    def flush_outboxes(self) -> None:
        if not self.outboxes:  # the usual case, at every turn
            return
        for key, box in list(self.outboxes.items()):
            while box.replies and self.send(*key, box.replies[0]):
                box.size -= sum(len(frame) for frame in box.replies.popleft())
            if not box.replies:
                del self.outboxes[key]

    def send(self, socket: zmq.Socket, client: bytes, frames: list) -> bool:
        """Send one reply; False when the client's pipe is full. A client that has gone counts as sent."""
        try:
            socket.send_multipart([client, *frames], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        except zmq.ZMQError as e:  # the client went away (EHOSTUNREACH)
            if socket is self.door_socket and client in RECONNECTING_DOORS:
                return False  # a door being restarted: its replies wait in its outbox until it is back
            log.debug("reply to %s dropped: %s", client[:12].hex(), e)
        return True

    def count_drop(self, client: bytes) -> None:
        self.stats["replies_dropped_unread"] += 1
        now = time.monotonic()
        if now - self.last_drop_log > DROP_LOG_INTERVAL:
            self.last_drop_log = now
            log.warning("dropped a reply to %s, which does not read its replies (%d unread and %d MB held); "
                        "%d dropped so far", client[:12].hex(), self.config.max_unread_replies,
                        OUTBOX_BYTES >> 20, self.stats["replies_dropped_unread"])

    def fail(self, request: Request, code: str, message: str) -> None:
        self.scheduler.release(request)
        if request.finished:
            return
        request.finished = True
        self.stats["errors"] += 1
        self.reply(request.socket, request.client, pack_error(request.request_id, code, message, request.echo),
                   request.enveloped)

    def expire(self, now: float) -> None:
        for request in self.scheduler.expire(now):
            self.time_out(request)

    def time_out(self, request: Request) -> None:
        self.stats["timeouts_dropped"] += 1
        self.fail(request, ERR_TIMEOUT, "the request's timeout passed while it was queued")

    # ------------------------------------------------------------ clients that leave

    def note_peer(self, frame: zmq.Frame, client: bytes) -> None:
        try:
            fd = frame.get(zmq.SRCFD)
        except zmq.ZMQError:
            return
        previous = self.peers.get(fd)
        if previous is not None and previous != client:
            # The fd was closed and reused before the monitor's event came: that client is gone,
            # and the event, when it comes, is about it, not about this one.
            self.owed_disconnects[fd] = self.owed_disconnects.get(fd, 0) + 1
            self.drop_client(previous)
        self.peers[fd] = client

    def on_monitor_event(self, frames: list) -> None:
        event = parse_monitor_message([f.bytes for f in frames])
        kind, value = int(event["event"]), int(event["value"])
        if self.handshakes is not None:
            self.handshakes.on_event(kind, value, time.monotonic())
        elif self.authenticator is not None:
            self.authenticator.refusals.on_event(kind, value, time.monotonic())
        if kind == zmq.EVENT_DISCONNECTED:
            self.on_disconnected(value)

    def on_disconnected(self, fd: int) -> None:
        if self.owed_disconnects.get(fd):
            self.owed_disconnects[fd] -= 1
            return
        client = self.peers.pop(fd, None)
        if client is not None:
            self.drop_client(client)

    def drop_client(self, client: bytes) -> None:
        """Its queued work is dropped (no one would read the replies); jobs on workers finish."""
        self.outboxes.pop((self.frontend, client), None)
        dropped = self.scheduler.drop_client(self.frontend, client)
        in_intake = self.in_intake(lambda r: r.socket is self.frontend and r.client == client)
        self.abandon(dropped, in_intake)
        if dropped or in_intake:
            self.stats["disconnected_dropped"] += len(dropped) + len(in_intake)
            log.info("client %s disconnected: %d queued requests dropped", client[:12].hex(),
                     len(dropped) + len(in_intake))

    def cancel(self, socket: zmq.Socket, client: bytes, request_id: Any) -> None:
        """The client withdrew request `request_id` (the HTTP door, for a client that disconnected or
        that it stopped waiting for): as for a client that left, its queued work is dropped and jobs
        on workers finish; nothing more is sent for it. Counted apart from disconnections
        (`cancelled_dropped`): the connection that cancels is still there. An id unknown or already
        answered is ignored: a cancel may cross its reply."""
        request = self.scheduler.find(socket, client, request_id)
        if request is None or request.finished:
            return
        sentences = self.scheduler.queued_sentences
        queued = self.scheduler.drop_request(request)
        in_intake = self.in_intake(lambda r: r is request)
        self.abandon([request] if not in_intake else [], in_intake)
        if queued or in_intake:
            self.stats["cancelled_dropped"] += 1
            log.info("request %s of %s cancelled: %s dropped", request_id, self.named(request),
                     f"{sentences - self.scheduler.queued_sentences} queued sentences" if queued else "it")

    def in_intake(self, wanted) -> list[Request]:
        return [p.request for p in self.intake.pending.values() if wanted(p.request)]

    def abandon(self, requests: list[Request], in_intake: list[Request]) -> None:
        """No one waits for these any more: no reply, and their tenant may send others. A job on a
        worker finishes and its result is discarded (`on_result`); a request the intake process is
        reading is released when it hands it back (`on_intake_done`)."""
        for request in requests:
            request.finished = True
            self.scheduler.release(request)
        for request in in_intake:
            request.finished = True

    # ------------------------------------------------------------ workers

    def dispatch(self) -> None:
        """Give queued jobs to ready workers, least loaded first, in the scheduler's fair order."""
        while self.scheduler.active:  # asked first: finding the least loaded worker costs more
            for slot, queries in self.places():
                job, expired = self.scheduler.next_job(time.monotonic(), queries)
                for request in expired:
                    self.time_out(request)
                if job is not None:
                    break
            else:
                return  # no worker has room, or none for the kinds of job queued
            slot.in_flight[job.job_id] = job
            # The time left, not a time of day: workers on other hosts share no clock with the broker.
            left = None if job.request.deadline is None else round(job.request.deadline - time.monotonic(), 3)
            header = P.job_header(job.job_id, left, job.is_tokenized, job.request.show_tokens, job.is_query)
            self.send_to_worker(slot, [P.JOB, header, job.payload])

    def places(self) -> list[tuple[WorkerSlot, bool | None]]:
        """Where the next job may go, best first, each with the kind of job it may take (for
        `Scheduler.next_job`: None any, True a query, False bulk work; see `WorkerSlot.room`): the
        least loaded worker with room for any job, else the least loaded one with room for a query,
        and the least loaded one with room for bulk work."""
        any_kind, queries, bulk = [], [], []
        for slot in self.workers():
            bulk_room, query_room = slot.room()
            if bulk_room and query_room:
                any_kind.append(slot)
            elif query_room:
                queries.append(slot)
            elif bulk_room:
                bulk.append(slot)
        places: list[tuple[WorkerSlot, bool | None]] = []
        for slots, kind in ((any_kind, None), (queries, True), (bulk, False)):
            if slots:
                places.append((min(slots, key=lambda s: (len(s.in_flight) / s.capacity, s.load)), kind))
        return places

    def workers(self) -> list[WorkerSlot]:
        """Every worker: this host's, then those of other hosts that joined."""
        return self.slots + self.remote_slots

    def send_to_worker(self, slot: WorkerSlot, frames: list) -> None:
        """Send a message to a worker: over its link (a broken one is closed, and the worker is
        buried once its process is seen gone or silent), or over the worker port."""
        if slot.remote:
            slot.socket.send_multipart([slot.identity, *frames], copy=False)
        elif slot.link is not None:
            try:
                slot.link.send(frames)
            except LinkClosed as e:
                self.close_link(slot, str(e))

    # -------------------------------------------- links of this host's workers

    def accept_links(self) -> None:
        """Take the connections waiting on the workers' listener: each from the pid of a worker this
        broker spawned and that has no link yet; any other is closed (and logged, at a bounded rate)."""
        for conn, pid, uid in self.listener.accept():
            slot = next((s for s in self.slots if s.link is None and s.process is not None and s.process.pid == pid
                         and s.respawn_at is None), None)
            if slot is None or uid != os.getuid():
                self.strangers.warning("refused a connection to the workers' socket from pid %s: not a worker "
                                       "this broker spawned", pid)
                conn.close()
                continue
            slot.link = BrokerSide(conn)
            if self.poller is not None:
                self.poller.register(slot.link, POLLIN)
                slot.link.polled = POLLIN
            log.debug("worker %d (pid %s) linked", slot.index, pid)

    def read_links(self, events: dict) -> None:
        if self.listener_key in events:
            self.accept_links()
        for slot in self.slots:
            link = slot.link
            flags = events.get(link.fileno(), 0) if link is not None else 0
            try:
                if flags & POLLOUT:
                    link.flush()
                if flags & POLLIN:
                    for frames in link.read(DRAIN_MESSAGES):
                        self.on_worker_message(slot, frames)
            except LinkClosed as e:
                self.close_link(slot, str(e))

    def poll_link_output(self) -> None:
        """Poll a link for room to write only while its outbox holds something: a socket with room
        is ready to write at every poll."""
        for slot in self.slots:
            link = slot.link
            if link is not None and self.poller is not None:
                wanted = POLLIN | (POLLOUT if link.wants_write else 0)
                if wanted != link.polled:
                    self.poller.register(link, wanted)
                    link.polled = wanted

    def close_link(self, slot: WorkerSlot, why: str = "") -> None:
        """Close a local worker's link (its process is buried when seen gone or silent)."""
        link, slot.link = slot.link, None
        if link is None:
            return
        if why:
            log.debug("worker %d's link closed: %s", slot.index, why)
        if self.poller is not None and link.polled:
            self.poller.unregister(link)
        link.close()

    def on_worker_message(self, slot: WorkerSlot, frames: list) -> None:
        try:
            self.handle_worker_message(slot, frames)
        except Exception:  # workers are ours, but a bug in handling one message must not stop serving
            log.exception("unexpected error on a message from worker %d", slot.index)

    def handle_worker_message(self, slot: WorkerSlot, frames: list) -> None:
        command = frames[0]
        if command == P.READY:
            info = P.json_object(frames[1])
            if not ready_is_from_spawned(info, slot.process.pid):  # the link's peer is that pid: a bug if not
                log.error("ignored READY for worker %d from pid %r: the broker spawned pid %s", slot.index,
                          info.get("pid"), slot.process.pid)
                return
        slot.last_seen = time.monotonic()
        if command == P.RESULT:
            self.on_result(slot, P.read_result_header(frames[1]), frames[2] if len(frames) > 2 else None)
        elif command == P.READY:
            self.mark_ready(slot, info)
            slot.quick_deaths = 0
            if slot.restarts:
                log.info("worker %d is back (pid %s)", slot.index, slot.info.get("pid"))
        elif command == P.FAILED:
            message = P.json_object(frames[1]).get("message", "worker failed to start")
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
        if command == P.HELLO:
            if slot is not None:
                self.bury(slot, "said HELLO again (its connection to the head restarted)", time.monotonic())
            self.on_hello(identity, frames)
        elif slot is None:
            self.worker_port.socket.send_multipart([identity, P.STOP])
        elif command == P.READY:
            info = P.json_object(frames[2].bytes if len(frames) > 2 else b"")
            # pid and address as the head first saw them: a worker does not rename itself later
            self.mark_ready(slot, {**info, "pid": slot.info.get("pid"), "address": slot.info.get("address")})
            log.info("worker %s (pid %s) of another host joined: %s, %d jobs in hand", slot.name, slot.pid,
                     slot.info.get("device"), slot.capacity)
        elif command == P.FAILED:
            message = P.json_object(frames[2].bytes if len(frames) > 2 else b"").get("message")
            self.bury(slot, f"could not load the model: {message}", time.monotonic())
        else:
            slot.last_seen = time.monotonic()
            if command == P.RESULT and len(frames) > 2:
                self.on_result(slot, P.read_result_header(frames[2].bytes), frames[3] if len(frames) > 3 else None)

    def on_hello(self, identity: bytes, frames: list) -> None:
        hello = P.json_object(frames[2].bytes if len(frames) > 2 else b"")
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

    def on_result(self, slot: WorkerSlot, header: dict, data: Any) -> None:
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
        self.scheduler.release(request)
        shapes = [part[0] for part in request.parts]
        buffers = [part[1] for part in request.parts]
        tokens = [t for part in request.parts for t in part[2]] if request.show_tokens else None
        self.reply(request.socket, request.client,
                   pack_vectors(request.request_id, dtype, shapes, buffers, tokens, request.n_tokens, request.echo),
                   request.enveloped)
        self.stats["requests"] += 1
        self.stats["sentences"] += request.sentences
        self.metrics.observe(request.received, request.dispatched, request.compute_ms, request.n_tokens)
        log.debug("request %d: %d sentences in %.1f ms", request.request_id, request.sentences,
                  (time.monotonic() - request.received) * 1000)

    def send_heartbeats(self) -> None:
        for slot in self.workers():
            if slot.ready:
                self.send_to_worker(slot, [P.HEARTBEAT])

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
        self.close_link(slot)
        self.by_identity.pop(slot.identity, None)
        for job in sorted(slot.in_flight.values(), key=lambda j: j.job_id, reverse=True):
            if not self.scheduler.retry(job):
                self.fail(job.request, ERR_SERVER,
                          f"this request was on {job.attempts} workers that died while encoding it; "
                          "it is not retried again")
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
                **self.scheduler.status(),
                "intake": {"pid": self.intake.process.pid, "requests": len(self.intake.pending),
                           "bytes": self.intake.backlog, "restarts": self.intake.restarts} if self.intake else None,
                "doors": self.doors.status(), **self.stats,
                "peers_turned_away": self.handshakes.total if self.handshakes else 0,
                "connections_refused": self.authenticator.refusals.refused if self.authenticator else 0,
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
                 self.scheduler.queued_jobs)
        if self.frontend is not None:
            for request in self.scheduler.drop_all() + [p.request for p in self.intake.pending.values()]:
                self.fail(request, ERR_UNAVAILABLE, "the server shut down before this request was encoded")
            remote = self.worker_port.socket if self.worker_port else None
            self.watch(self.frontend, self.door_socket, remote)  # not the intake, nor the monitor: done with
            deadline = time.monotonic() + SHUTDOWN_GRACE
            while any(s.in_flight for s in self.workers()) and time.monotonic() < deadline:
                events = dict(self.poller.poll(100))
                self.read_links(events)
                if remote is not None and remote in events:
                    self.drain(remote, self.on_remote_message)
                for socket, key in self.client_sockets:
                    if key in events:
                        self.drain(socket, lambda frames, s=socket: self.on_client_message(s, frames))
                for slot in self.slots:
                    if slot.in_flight and slot.process.exitcode is not None:  # died: no replacement now
                        self.fail_jobs(list(slot.in_flight.values()), "a worker died while the server shut down")
                        slot.in_flight = {}
                self.poll_link_output()
            self.fail_jobs([j for s in self.workers() for j in s.in_flight.values()],
                           f"the server shut down; encoding did not finish within {SHUTDOWN_GRACE:.0f} s")
        self.doors.stop()
        if self.intake is not None:
            self.intake.stop()
        self.stop_workers()
        if self.worker_port is not None:
            self.worker_port.close()
        if self.authenticator is not None:
            self.authenticator.stop()
        if self.monitor is not None:
            self.frontend.disable_monitor()
        for socket in (self.monitor, self.frontend, self.door_socket):
            if socket is not None:
                socket.close(linger=0)
        for slot in self.slots:
            self.close_link(slot)
        self.listener.close()
        self.context.term()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        log.info("stopped")

    def finish_link_output(self, deadline: float) -> None:
        """Send what the links' outboxes hold (a STOP behind a job), until `deadline` at most."""
        while time.monotonic() < deadline:
            waiting = [slot for slot in self.slots if slot.link is not None and slot.link.wants_write]
            if not waiting:
                return
            for slot in waiting:
                try:
                    slot.link.flush()
                except LinkClosed as e:
                    self.close_link(slot, str(e))
            time.sleep(0.01)

    def fail_jobs(self, jobs: list[Job], message: str) -> None:
        for job in jobs:
            self.fail(job.request, ERR_UNAVAILABLE, message)

    def stop_workers(self) -> None:
        """Stop this host's workers; those of other hosts are told STOP too, and wait for a head."""
        for slot in self.workers():
            if slot.remote or (slot.process is not None and slot.process.exitcode is None and slot.ready):
                self.send_to_worker(slot, [P.STOP])
        self.finish_link_output(time.monotonic() + 1)
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


def _peer_address(frame: zmq.Frame) -> str | None:
    """The TCP peer's address, as libzmq saw the connection."""
    try:
        return frame.get("Peer-Address")
    except (zmq.ZMQError, AttributeError):
        return None

"""The client port without libzmq's I/O thread: the server side of a ROUTER socket, ZMTP 3.1 with
the NULL mechanism, over plain TCP, read and written by the broker's own loop.

Why: through a libzmq socket a request wakes the port's I/O thread, which then wakes the broker, and
a reply goes back the same way: one more thread to schedule per message, on 2 cores shared with the
model. Measured on 2 vCPUs, one sentence per request, this server against itself with
-zmq_client_port in the same runs (issue 13): p99 lower in 6 runs of 6 (by 0.1-2.7 ms), the
broker's CPU per query 0.54-0.61 ms against 0.66 ms, and p50 the same within the noise (-0.16 to
+0.13 ms; stand-ins of the path had promised 0.16-0.31 ms). Clients notice nothing: BertClient,
pyzmq and any libzmq DEALER socket speak this protocol already.

What it speaks (ZMTP 3.0, rfc.zeromq.org/spec/23, and 3.1, spec/37):

    greeting    64 bytes each way: FF, 8 x 00, 7F, version 3.1, mechanism "NULL", as-server, filler
    handshake   each side sends a READY command: our Socket-Type is ROUTER; a peer's Socket-Type must
                be DEALER, REQ or ROUTER, and its Identity, if it sets one, names it (else we do)
    traffic     frames: flags (MORE 1, LONG 2, COMMAND 4), size (1 byte, or 8 big-endian), body;
                the commands PING (libzmq's heartbeats) get their PONG, others are ignored

Anything else (HTTP, a probe, the 2019 client's PUSH socket, CurveZMQ or ZMTP 2 peers) is closed
during the handshake and reported to `on_refused`, as libzmq's monitor events were before. With
-auth_dir, or -zmq_client_port, the port stays a libzmq socket: CurveZMQ is not reimplemented here.

It mimics the few parts of a pyzmq ROUTER socket the broker uses, so that the broker's code is the
same for both: `recv_multipart` (the client's id first), `send_multipart` (raises `zmq.Again` while
the client has -max_unread_replies replies unsent, as SNDHWM did), `getsockopt(zmq.EVENTS)`, and
`fileno` for the poller (an epoll fd, readable while any connection has something to do).
"""
from __future__ import annotations

import errno
import logging
import select
import socket
import struct
import time
from collections import deque
from typing import Callable

import zmq

from .link import POLLIN, advance, bytes_of
from .logs import LogLimiter

log = logging.getLogger(__name__)

SIGNATURE = b"\xff" + b"\x00" * 8 + b"\x7f"
GREETING = SIGNATURE + bytes([3, 1]) + b"NULL".ljust(20, b"\x00") + b"\x01" + b"\x00" * 31
MORE, LONG, COMMAND = 1, 2, 4
PEER_TYPES = {b"DEALER", b"REQ", b"ROUTER"}  # those a libzmq ROUTER accepts
# Frames per message. Our protocol uses 2; up to this many the broker answers with a clear error,
# past it the connection is closed (a message of many empty frames costs far more memory in objects
# than on the wire; libzmq had no such cap).
MAX_FRAMES = 4096
MAX_IDENTITY_BYTES = 255      # ZMTP's own limit on a routing id
MAX_COMMAND_BYTES = 1 << 16   # a READY or a PING is tens of bytes; a peer not yet known gets no more
HANDSHAKE_TIMEOUT = 30.0      # seconds to finish the greeting and READY (libzmq's ZMQ_HANDSHAKE_IVL)
# Seconds a message begun may go without a byte more of it (commands between its frames do not
# count) before its connection is closed. Judged on progress, not on the whole message's time: a large request over a slow link keeps arriving and is
# never cut, however long it takes, while a peer that sends most of a 256 MB frame and stops frees
# that memory at this deadline. (Bytes that wait in the kernel because this side did not read them
# are not the peer's stall.) As long as the handshake's: TCP gives up resending sooner than that.
MESSAGE_STALL_TIMEOUT = 30.0
# A connection holding at most this much of an unfinished message is never cut for the cap on all
# of them together (`max_buffered`): a query is a few KB, and the cap is about large messages.
UNCAPPED_BYTES = 1 << 16
RECV_CHUNK = 1 << 18          # bytes one recv asks for
READ_BUDGET = 1 << 22         # bytes read from one connection per pump, so that no client starves the rest
# Parsed work held for the broker. Whole messages waiting to be taken: past this many, no connection
# is read (its bytes wait in the kernel, and TCP holds the sender back), as libzmq's receive limit
# did; 2-byte messages would otherwise turn every 4 MB read into ~2 million objects.
MAX_PARSED = 1024
# Frames and commands parsed from one connection per pump: the rest waits in its inbox (and it is
# not read) until the next, so that a flood of tiny frames or PINGs does not hold the loop for seconds.
PARSE_BUDGET = 256
ACCEPT_BUDGET = 64            # connections accepted per pump
ACCEPT_PAUSE = 0.5            # seconds the port stops accepting when the process is out of fds or memory
_LONG_SIZE = struct.Struct(">Q")


def _ready_command(properties: dict[bytes, bytes]) -> bytes:
    body = b"\x05READY" + b"".join(bytes([len(k)]) + k + struct.pack(">I", len(v)) + v for k, v in properties.items())
    return _frame_header(len(body), COMMAND) + body


def _frame_header(size: int, flags: int) -> bytes:
    return bytes([flags | LONG]) + _LONG_SIZE.pack(size) if size > 255 else bytes([flags, size])


def parse_properties(data: bytes) -> dict[bytes, bytes]:
    """A READY command's metadata: name length (1 byte), name, value length (4 bytes), value."""
    properties, pos = {}, 0
    while pos < len(data):
        n = data[pos]
        name, pos = data[pos + 1:pos + 1 + n], pos + 1 + n
        if pos + 4 > len(data):
            raise ValueError("truncated metadata")
        (size,), pos = struct.unpack_from(">I", data, pos), pos + 4
        if pos + size > len(data):
            raise ValueError("truncated metadata")
        properties[name.lower()], pos = data[pos:pos + size], pos + size
    return properties


class Frame(bytes):
    """A received frame, read the way the broker reads pyzmq's (`.bytes`, `.buffer`, `len()`), and
    sent on as it is (the intake process's socket takes it as bytes)."""

    __slots__ = ()

    @property
    def bytes(self) -> bytes:
        return self

    @property
    def buffer(self) -> memoryview:
        return memoryview(self)


class Identity(Frame):
    """A client's id, the first frame of each of its messages. Like a pyzmq frame, it tells what the
    client's READY said: `get("Socket-Type")` (the broker answers a REQ socket as a REP would)."""

    def __new__(cls, value: bytes, socket_type: str = "") -> "Identity":
        identity = super().__new__(cls, value)
        identity.socket_type = socket_type
        return identity

    def get(self, option: str) -> str:
        if option == "Socket-Type" and self.socket_type:
            return self.socket_type
        raise zmq.ZMQError(zmq.EINVAL)


class Peer:
    """One client connection: what has come in and not been parsed yet, and what waits to go out."""

    __slots__ = ("sock", "fd", "identity", "inbox", "greeted", "ready", "parts", "parts_bytes", "held", "outbox",
                 "queued", "sent", "ends", "opened", "heard", "writing")

    def __init__(self, sock: socket.socket, opened: float) -> None:
        self.sock, self.fd, self.opened, self.heard = sock, sock.fileno(), opened, opened
        self.identity = Identity(b"")
        self.inbox = bytearray()
        self.greeted = self.ready = self.writing = False
        self.parts: list[Frame] = []   # frames of a message still coming
        self.parts_bytes = 0
        self.held = 0                   # bytes of a message not yet whole: its frames so far and the inbox
        self.outbox: list[memoryview] = []  # what the socket could not take yet, in order
        self.queued = self.sent = 0     # bytes ever put in the outbox, and handed to the kernel
        self.ends: deque[int] = deque()  # where each message not wholly sent ends, in `queued` bytes

    @property
    def unsent(self) -> int:
        """Messages not wholly handed to the kernel."""
        return len(self.ends)

    def put(self, views: list[memoryview], message: bool) -> None:
        """Queue bytes to send; `message`: they end a message (not a greeting or a command)."""
        self.outbox += views
        self.queued += sum(view.nbytes for view in views)
        if message:
            self.ends.append(self.queued)


class ProtocolViolation(Exception):
    """What a peer sent is not ZMTP 3, or is over a limit: its connection is closed."""


class OverCapacity(ProtocolViolation):
    """A connection's unfinished message would take the bytes held for all of them past the cap."""


class ZmtpRouter:
    """The client port (see the module's docstring). `max_frame` caps one frame and one message, as
    ZMQ_MAXMSGSIZE did: a bigger one closes the connection before it uses memory. `max_buffered`
    caps the bytes held for messages not yet whole, all connections together (libzmq had no such
    cap): a connection whose message would take them past it is closed (default: `max_frame`)."""

    def __init__(self, host: str, port: int, max_frame: int, max_unsent: int,
                 on_refused: Callable[[str], None] = lambda reason: None, max_buffered: int | None = None) -> None:
        self.max_frame, self.max_unsent, self.on_refused = max_frame, max_unsent, on_refused
        self.max_buffered = max_buffered if max_buffered is not None else max_frame
        self.buffered = 0  # bytes held for messages not yet whole (the sum of the peers' `held`)
        address = host_address(host)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.listener = socket.create_server((address, port), family=family, backlog=128)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.epoll = select.epoll()
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        self.by_fd: dict[int, Peer] = {}
        self.by_identity: dict[bytes, Peer] = {}
        self.messages: deque[list[Frame]] = deque()  # whole messages, the client's id first
        self.backlogged: set[Peer] = set()             # peers whose inbox holds frames not parsed yet
        self.departed: list[bytes] = []                # clients whose connection closed
        self.next_id = 1
        self.closed = False
        self.accept_paused_until = 0.0
        # Lines a peer can make the server repeat, at most one per 10 s each.
        self.accept_errors, self.violations = LogLimiter(log), LogLimiter(log)
        self.overloads, self.evictions, self.stalls = LogLimiter(log), LogLimiter(log), LogLimiter(log)

    # ------------------------------------------------------------ the socket-like face

    def fileno(self) -> int:
        return self.epoll.fileno()

    def recv_multipart(self, flags: int = 0, copy: bool = True) -> list[Frame]:
        """The next whole message, [client id, frames...]; zmq.Again when there is none (never blocks)."""
        if not self.messages:
            self.pump()
            if not self.messages:
                raise zmq.Again()
        return self.messages.popleft()

    def has_backlog(self) -> bool:
        """Whether work is held that the poll fd does not show: messages not taken, bytes not parsed."""
        return bool(self.messages or self.backlogged)

    def getsockopt(self, option: int) -> int:
        if option == zmq.EVENTS:
            return POLLIN if self.messages else 0
        raise zmq.ZMQError(zmq.EINVAL)

    def send_multipart(self, frames: list, flags: int = 0, copy: bool = True) -> None:
        """Send [client id, frames...] without blocking. zmq.Again while that client has
        `max_unsent` messages the kernel has not taken; a client that has gone is skipped silently
        (the broker counts a reply to it as sent, as with ROUTER_MANDATORY's EHOSTUNREACH)."""
        if len(frames) < 2:
            raise ValueError("a message needs the client's id and at least one frame")
        peer = self.by_identity.get(bytes(frames[0]))
        if peer is None:
            return
        if peer.unsent >= self.max_unsent:
            raise zmq.Again()
        last, views = len(frames) - 1, []
        for i in range(1, len(frames)):
            view = bytes_of(frames[i])
            views += [memoryview(_frame_header(view.nbytes, MORE if i < last else 0)), view]
        peer.put(views, message=True)
        self.flush(peer)

    def take_departed(self) -> list[bytes]:
        """The clients whose connection closed since the last call."""
        gone, self.departed = self.departed, []
        return gone

    def close(self, linger: int | None = None) -> None:
        """Close every connection; replies the kernel has not taken are dropped (LINGER 0)."""
        if self.closed:
            return
        self.closed = True
        for peer in list(self.by_fd.values()):
            peer.sock.close()
        self.by_fd.clear()
        self.by_identity.clear()
        self.listener.close()
        self.epoll.close()

    # ------------------------------------------------------------ events

    def pump(self) -> None:
        """Handle whatever the connections have ready: new clients, bytes in, room to write."""
        for peer in list(self.backlogged):
            if len(self.messages) >= MAX_PARSED:
                break
            if self.by_fd.get(peer.fd) is not peer:  # closed meanwhile (to make room under the cap, say)
                continue
            self.backlogged.discard(peer)
            self.take(peer, peer.inbox)
        for fd, events in self.epoll.poll(0):
            if fd == self.listener.fileno():
                self.accept()
                continue
            peer = self.by_fd.get(fd)
            if peer is None:
                continue
            if events & select.EPOLLOUT:
                self.flush(peer)
            if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and self.by_fd.get(fd) is peer \
                    and peer not in self.backlogged and len(self.messages) < MAX_PARSED:
                self.read(peer)

    def tick(self, now: float) -> None:
        """Housekeeping, every half second or so: close connections that have not finished the
        handshake within HANDSHAKE_TIMEOUT (a peer that connects and says nothing, or too little,
        would otherwise hold its socket forever) or whose unfinished message has had no byte more
        for MESSAGE_STALL_TIMEOUT (it would hold its memory forever), and accept again after a pause."""
        for peer in list(self.by_fd.values()):
            if not peer.ready:
                if now - peer.opened > HANDSHAKE_TIMEOUT:
                    self.drop(peer, refused="no handshake within %.0f s" % HANDSHAKE_TIMEOUT)
            elif peer.held and now - peer.heard > MESSAGE_STALL_TIMEOUT and peer not in self.backlogged:
                if self.has_unread_bytes(peer):
                    peer.heard = now  # this side has not read them (the broker was behind): no stall of the peer's
                else:
                    self.drop(peer, violation="its message of %d bytes so far had no byte more for %.0f s"
                              % (peer.held, now - peer.heard), limiter=self.stalls)
        if self.accept_paused_until and now >= self.accept_paused_until:
            self.accept_paused_until = 0.0
            self.epoll.register(self.listener.fileno(), select.EPOLLIN)

    @staticmethod
    def has_unread_bytes(peer: Peer) -> bool:
        """Whether the kernel holds bytes from `peer` that this side has not read yet (or its end)."""
        try:
            peer.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True  # an error to read: the next read finds it and closes the connection
        return True

    def accept(self) -> None:
        for _ in range(ACCEPT_BUDGET):
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):  # that peer gave up already
                    continue
                self.pause_accepting(e)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = Peer(sock, time.monotonic())
            self.by_fd[peer.fd] = peer
            self.epoll.register(peer.fd, select.EPOLLIN)
            # Our greeting and READY at once: NULL needs nothing from the peer before them.
            peer.put([memoryview(GREETING + _ready_command({b"Socket-Type": b"ROUTER"}))], message=False)
            self.flush(peer)

    def pause_accepting(self, error: OSError) -> None:
        """Out of file descriptors (EMFILE) or memory: new connections wait in the kernel's backlog
        and the listener leaves the poll for ACCEPT_PAUSE seconds; left in, its readiness would turn
        the broker's loop into a busy loop."""
        self.accept_errors.warning("cannot accept client connections (%s) with %d open; trying again every "
                                   "%.1f s", error.strerror or error, len(self.by_fd), ACCEPT_PAUSE)
        self.epoll.unregister(self.listener.fileno())
        self.accept_paused_until = time.monotonic() + ACCEPT_PAUSE

    def read(self, peer: Peer) -> None:
        budget = READ_BUDGET
        while budget > 0:
            try:
                data = peer.sock.recv(RECV_CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            received = len(data)
            if not data:
                self.drop(peer, refused=None if peer.ready else "closed during the handshake")
                return
            budget -= len(data)
            if peer.inbox:
                peer.inbox += data
                data = peer.inbox
            if not self.take(peer, data) or received < RECV_CHUNK:
                return  # closed, a backlog to parse first, or a short read: the socket is drained

    def take(self, peer: Peer, data: bytes | bytearray) -> bool:
        """Parse what `data` holds whole and keep the rest as the peer's inbox. False when the peer
        was closed, or left with frames to parse at the next pump (then it is not read meanwhile)."""
        try:
            used = self.parse(peer, data)
            if self.by_fd.get(peer.fd) is not peer:
                return False  # closed while it was parsed (a PONG could not be sent)
            self.hold(peer, peer.parts_bytes + len(data) - used)
        except ProtocolViolation as e:
            limiter = self.overloads if isinstance(e, OverCapacity) else self.violations
            self.drop(peer, refused=None if peer.ready else str(e), violation=str(e) if peer.ready else None,
                      limiter=limiter)
            return False
        if used == len(data):
            peer.inbox = bytearray()
        elif data is peer.inbox:
            del peer.inbox[:used]
        else:
            peer.inbox = bytearray(memoryview(data)[used:])
        return peer not in self.backlogged

    def hold(self, peer: Peer, held: int) -> None:
        """Count what `peer` now holds of a message not yet whole (its frames parsed and its inbox),
        and when that message last grew (`heard`: commands between its frames, PINGs say, do not
        keep it from the stall deadline). When it grows past UNCAPPED_BYTES and takes all connections
        together past `max_buffered`, the connection holding the most is closed, its bytes freed:
        another, if it holds more than this one (one that stopped sending, typically; an honest
        large request arrives in a fraction of a second), else this one (OverCapacity). Counted on
        bytes received, not on the size a frame announces: an announcement costs a peer nothing."""
        grown = held - peer.held
        if grown > 0 and held > UNCAPPED_BYTES:
            while self.buffered + grown > self.max_buffered:
                others = [p for p in self.by_fd.values() if p.held and p is not peer]
                hog = max(others, key=lambda p: p.held, default=None)
                if hog is None or hog.held <= held:
                    raise OverCapacity(f"its message of {held} bytes so far would take the bytes held for unfinished "
                                       f"messages past {self.max_buffered} (the others: {self.buffered - peer.held} "
                                       f"bytes on {len(others)} connections)")
                self.drop(hog, violation=f"its unfinished message of {hog.held} bytes was the largest when the bytes "
                                         f"held for all of them were to pass {self.max_buffered}: closed to make room",
                          limiter=self.evictions)
        if grown > 0:
            peer.heard = time.monotonic()
        self.buffered += grown
        peer.held = held

    def parse(self, peer: Peer, data: bytes | bytearray) -> int:
        """Take the greeting, commands and frames whole in `data`, up to PARSE_BUDGET of them and
        while fewer than MAX_PARSED messages wait (else the peer is marked backlogged); returns how
        many bytes were used."""
        pos, end, parsed = 0, len(data), 0
        if not peer.greeted:
            if data[0] != 0xFF or (end >= 10 and data[9] & 1 != 1):
                raise ProtocolViolation("not ZMTP (no ZeroMQ greeting)")
            if end >= 11 and data[10] < 3:
                raise ProtocolViolation(f"ZMTP {data[10]}, too old (ZeroMQ 4 speaks 3)")
            if end < 64:
                return 0
            if bytes(data[12:32]).rstrip(b"\x00") != b"NULL":
                mechanism = bytes(data[12:32]).rstrip(b"\x00").decode("ascii", "replace")
                raise ProtocolViolation(f"security mechanism {mechanism}, and this port has none (-auth_dir is off)")
            peer.greeted, pos = True, 64
        while end - pos >= 2:
            if parsed >= PARSE_BUDGET or len(self.messages) >= MAX_PARSED:
                self.backlogged.add(peer)
                break
            parsed += 1
            flags = data[pos]
            if flags & LONG:
                if end - pos < 9:
                    break
                size, head = _LONG_SIZE.unpack_from(data, pos + 1)[0], 9
            else:
                size, head = data[pos + 1], 2
            if (flags & COMMAND or not peer.ready) and size > MAX_COMMAND_BYTES:
                raise ProtocolViolation(f"a command of {size} bytes")
            if size > self.max_frame or peer.parts_bytes + size > self.max_frame:
                raise ProtocolViolation(f"a message over {self.max_frame} bytes")
            if end - pos - head < size:
                break
            body = Frame(memoryview(data)[pos + head:pos + head + size])  # the one copy
            pos += head + size
            if flags & COMMAND:
                self.on_command(peer, body)
            elif not peer.ready:
                raise ProtocolViolation("a message before READY")
            else:
                peer.parts.append(body)
                peer.parts_bytes += size
                if not flags & MORE:
                    self.messages.append([peer.identity, *peer.parts])
                    peer.parts, peer.parts_bytes = [], 0
                elif len(peer.parts) >= MAX_FRAMES:
                    raise ProtocolViolation(f"a message of more than {MAX_FRAMES} frames")
        return pos

    def on_command(self, peer: Peer, body: bytes) -> None:
        name = body[1:1 + body[0]] if body else b""
        if name == b"READY" and not peer.ready:
            try:
                properties = parse_properties(body[1 + body[0]:])
            except ValueError as e:
                raise ProtocolViolation(f"a bad READY: {e}") from None
            kind = properties.get(b"socket-type", b"")
            if kind not in PEER_TYPES:
                raise ProtocolViolation(f"a {kind.decode('ascii', 'replace') or 'nameless'} socket, not a DEALER or REQ")
            self.name(peer, properties.get(b"identity", b""), kind.decode("ascii"))
        elif name == b"PING" and peer.ready:  # answered with its context (after the 2-byte TTL)
            if peer.queued - peer.sent > MAX_COMMAND_BYTES:
                return  # it is not reading: no more for it to hold here (libzmq keeps one PONG pending)
            context = body[1 + 4 + 2:][:16]
            pong = b"\x04PONG" + context
            peer.put([memoryview(_frame_header(len(pong), COMMAND) + pong)], message=False)
            self.flush(peer)
        elif not peer.ready:
            raise ProtocolViolation("no READY")

    def name(self, peer: Peer, wanted: bytes, socket_type: str) -> None:
        """The client's id: the Identity it set, unless empty, reserved (a leading zero byte, as libzmq
        reserves it), too long or taken; else one of ours."""
        if wanted and wanted[0] != 0 and len(wanted) <= MAX_IDENTITY_BYTES and wanted not in self.by_identity:
            peer.identity = Identity(wanted, socket_type)  # made once: every message starts with it as it is
        else:
            peer.identity = Identity(b"\x00" + struct.pack(">I", self.next_id), socket_type)
            self.next_id = (self.next_id + 1) & 0xFFFFFFFF
        peer.ready = True
        self.by_identity[peer.identity] = peer

    # ------------------------------------------------------------ writing

    def flush(self, peer: Peer) -> None:
        """Hand the kernel what it takes of the peer's outbox now; watch for room if some is left."""
        while peer.outbox:
            try:
                sent = peer.sock.sendmsg(peer.outbox[:64])  # under any system's IOV_MAX
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.drop(peer, refused=None if peer.ready else "reset during the handshake")
                return
            peer.outbox, peer.sent = advance(peer.outbox, sent), peer.sent + sent
            while peer.ends and peer.ends[0] <= peer.sent:
                peer.ends.popleft()
        writing = bool(peer.outbox)
        if writing != peer.writing and self.by_fd.get(peer.fd) is peer:
            peer.writing = writing
            self.epoll.modify(peer.fd, select.EPOLLIN | (select.EPOLLOUT if writing else 0))

    def drop(self, peer: Peer, refused: str | None = None, violation: str | None = None,
             limiter: LogLimiter | None = None) -> None:
        """Close a connection. Before its handshake finished, that is a peer turned away; after, a
        `violation` is logged through `limiter` (one per kind of reason: one kind does not hide another)."""
        if self.by_fd.pop(peer.fd, None) is None:
            return
        self.backlogged.discard(peer)
        self.buffered -= peer.held
        peer.held, peer.inbox, peer.parts = 0, bytearray(), []
        try:
            self.epoll.unregister(peer.fd)
        except OSError:
            pass
        peer.sock.close()
        if peer.ready:
            self.by_identity.pop(peer.identity, None)
            self.departed.append(peer.identity)
            if violation:
                (limiter or self.violations).warning("closed the connection of client %s: %s",
                                                     peer.identity[:12].hex(), violation)
        elif refused:
            log.debug("turned away a peer: %s", refused)
            self.on_refused(refused)


def host_address(host: str) -> str:
    """The address to listen on for -host: '*' is every IPv4 interface, as in a ZeroMQ endpoint."""
    return "0.0.0.0" if host in ("*", "") else host

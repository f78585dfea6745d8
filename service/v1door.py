"""The 2019 door: unmodified `bert-serving-client==1.10.0` code works against this server.

    python app.py -v1_port 5557 -v1_port_out 5558
    from bert_serving.client import BertClient          # the 2019 package, unchanged
    BertClient(ip="localhost", port=5557, port_out=5558).encode(["First do it ||| then do it right"])

A door (see `service/doors.py`): a process of its own that is one more client of the broker, like the
HTTP door, so the broker's batching, limits, busy answer and worker failover apply unchanged.

The 2019 wire protocol, as that client speaks it (its `bert_serving/client/__init__.py`):

    client PUSH --> v1_port (PULL)       [identity, msg, request_id, msg_len]
                    msg: JSON list of strings, JSON list of token lists, b"SHOW_CONFIG", b"SHOW_STATUS"
    client SUB  <-- v1_port_out (XPUB)   topic = the client's identity
                    config, status:  [identity, JSON object, request_id]
                    vectors:         [identity, JSON {dtype, shape, tokens}, raw C-order bytes, request_id]

What this door adds to that protocol, and why:
- A reply waits until its client's SUB has subscribed (the XPUB socket sees each subscription),
  for at most HOLD_FOR_SUBSCRIPTION seconds: a reply published before that is lost (ZeroMQ's slow
  joiner), and the 2019 client, whose timeout is -1 by default, would wait forever.
- Replies are never dropped at the high-water mark (XPUB_NODROP): a burst of `encode(...,
  blocking=False)` then `fetch_all()` gets every reply. Replies to a client whose pipe is full wait
  here, and are dropped (logged) only after HOLD_FOR_READER seconds in which it read none.
- The 2019 client has no error replies. An encoding error comes back as a vector header whose
  `dtype` is the error message, so that client raises at once `TypeError: data type 'bert-as-service
  refused this request: ...' not understood`, and stays usable. A config or status request that
  fails answers `server_version: "error: ..."`, which its version check shows.
- `"A ||| B"` (as the 2019 server split it) becomes the sentence pair [A, B]: [CLS] A [SEP] B [SEP].
- TERMINATION, which stopped the 2019 server, is ignored (logged): no network peer stops this one.
  Nothing is pickled; the 2019 protocol never needed it.
- A door that dies (and is restarted by the broker) loses none of the requests it had passed on: it
  connects to the broker under a fixed routing id (V1_DOOR_ID), the broker holds its replies while it
  is away, and each encode request carries, in its `echo`, whom its reply goes to, which the broker
  returns with the reply. (A request the door had read and not yet passed on, or a reply it had not
  yet published, dies with it: microseconds, unless a client's SUB was slow to subscribe.)
"""
from __future__ import annotations

import itertools
import json
import logging
import re
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from .client import BadRequestError, ProtocolError, check_texts, pack_request, unpack_reply_header, unpack_vectors
from .config import ServerConfig
from .logs import LogLimiter

log = logging.getLogger(__name__)

SERVER_VERSION = "1.10.0"        # the 2019 client refuses any other (check_version)
SHOW_CONFIG, SHOW_STATUS, TERMINATION = b"SHOW_CONFIG", b"SHOW_STATUS", b"TERMINATION"
HOLD_FOR_SUBSCRIPTION = 10.0     # seconds a reply waits for its client to subscribe
HOLD_FOR_READER = 300.0          # seconds replies wait for a subscribed client that reads none
# Replies held for all clients together, at most this many times -max_request_bytes (the cap the
# client port puts on unfinished messages): one that never subscribes or never reads, under many
# identities if it likes, would otherwise make the door hold HOLD_FOR_READER seconds of the GPUs'
# output. Past it, the client holding the most loses its oldest replies first.
HELD_PER_REQUEST_BYTES = 4
MAX_IDENTITY_BYTES = 256         # the 2019 client's identity is a 36-byte UUID
POLL_MS = 100
V1_DOOR_ID = b"door:v1"          # this door's routing id at the broker, the same after a restart
STOP_DRAIN = 2.0                 # seconds, after SIGTERM, to pass on replies the broker already sent
FOREIGN_LOG_INTERVAL = 60.0      # at most one "not the 2019 protocol" line per minute
# The 2019 server's own rule (Google's extract_features.py): "A ||| B" is a pair, split at the last ' ||| '.
PAIR = re.compile(r"(.*) \|\|\| (.*)", re.DOTALL)


class V1Error(Exception):
    """A request this door answers with an error."""


@dataclass
class Waiting:
    """A request passed to the broker, and where its reply goes."""

    identity: bytes
    request_id: bytes
    kind: bytes          # SHOW_CONFIG, SHOW_STATUS or b"ENCODE"


@dataclass
class Held:
    """Replies to one identity that could not be published yet (not subscribed, or its pipe full)."""

    since: float
    replies: deque = field(default_factory=deque)
    size: int = 0        # bytes of `replies`


# ---------------------------------------------------------------- the protocol


def parse_texts(msg: bytes) -> tuple[list, bool]:
    """(texts for our protocol, is_tokenized) from a 2019 encode message; raise V1Error.

    Like the 2019 server: a list of lists is tokenized input; strings "A ||| B" are pairs."""
    try:
        texts = json.loads(msg.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise V1Error("the message is not a JSON list of strings (nor SHOW_CONFIG / SHOW_STATUS)") from None
    if not isinstance(texts, list) or not texts:
        raise V1Error("encode() takes a non-empty list of strings or of token lists")
    is_tokenized = all(isinstance(item, list) for item in texts)
    if not is_tokenized:
        if not all(isinstance(item, str) for item in texts):
            raise V1Error("every item must be a string (or, for is_tokenized=True, every item a list of tokens)")
        texts = [split_pair(text) for text in texts]
    try:
        return check_texts(texts, is_tokenized), is_tokenized  # our protocol's own rules, checked here too
    except BadRequestError as e:
        raise V1Error(str(e)) from None


def split_pair(text: str) -> str | list[str]:
    """"A ||| B" -> [A, B] (stripped first, as the 2019 server did); any other text unchanged."""
    found = PAIR.fullmatch(text.strip()) if " ||| " in text else None
    return [found[1], found[2]] if found else text


def error_dtype(message: str) -> str:
    """An error as the 2019 client will show it: its `np.frombuffer(..., dtype=header['dtype'])`
    raises `TypeError: data type '<this>' not understood`. A comma would make numpy read the text
    as a list of fields (a ValueError about "format number 1" that hides the message)."""
    return ("bert-as-service refused this request: " + message).replace(",", ";")


def config_reply(described: dict, config: ServerConfig, identity: bytes) -> dict:
    """Our `server_config()` plus what the 2019 client reads: server_version (check_version),
    max_seq_len (check_length) and show_tokens_to_client (check_token_info)."""
    return {**described, "server_version": SERVER_VERSION, "show_tokens_to_client": True,
            "max_seq_len": described.get("max_seq_len"), "port": config.v1_port, "port_out": config.v1_port_out,
            "zmq_port": config.port, "client": identity.decode("utf-8", "replace"),
            "num_process": config.num_worker, "protocol": "bert-serving-client 1.10.0 compatibility"}


def error_config(message: str) -> dict:
    # The 2019 client checks the version first, and its message prints what it got.
    return {"server_version": f"error: {message}", "error": message, "max_seq_len": None,
            "show_tokens_to_client": False}


def vectors_reply(identity: bytes, request_id: bytes, header: dict, frames: list) -> list:
    """The 2019 vector reply: one C-order array (several jobs' parts joined) and its tokens."""
    vectors = np.ascontiguousarray(unpack_vectors(header, [f.buffer for f in frames]))
    info = {"dtype": str(vectors.dtype), "shape": list(vectors.shape), "tokens": header.get("tokens", "")}
    return [identity, json.dumps(info, ensure_ascii=False).encode("utf-8"), vectors, request_id]


def reply_bytes(reply: list) -> int:
    """What a reply's frames take (its vectors are a numpy array, the rest bytes)."""
    return sum(frame.nbytes if isinstance(frame, np.ndarray) else len(frame) for frame in reply)


def waiting_from_echo(echo: Any) -> Waiting | None:
    """Where an encode reply goes, from the echo its request carried: how a restarted door answers
    the requests its predecessor passed on."""
    try:
        identity, request_id = json.loads(echo)
        return Waiting(bytes.fromhex(identity), request_id.encode("ascii"), b"ENCODE")
    except (TypeError, ValueError, AttributeError):
        return None


def encode_error_reply(identity: bytes, request_id: bytes, code: str, message: str) -> list:
    info = {"dtype": error_dtype(message), "shape": [0], "tokens": "", "error": code, "message": message}
    return [identity, json.dumps(info, ensure_ascii=False).encode("utf-8"), b"", request_id]


# ---------------------------------------------------------------- the door


class V1Door:
    """PULL requests, pass them to the broker, publish its replies to the right subscriber."""

    def __init__(self, config: ServerConfig, broker_address: str) -> None:
        self.config = config
        self.context = zmq.Context()
        self.pull = self.context.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.setsockopt(zmq.MAXMSGSIZE, 4 * config.max_request_bytes)  # as the broker's own port
        self.publish = self.context.socket(zmq.XPUB)
        self.publish.setsockopt(zmq.LINGER, 0)
        self.publish.setsockopt(zmq.XPUB_NODROP, 1)  # a full pipe refuses (EAGAIN) instead of dropping
        self.broker = self.context.socket(zmq.DEALER)
        self.broker.setsockopt(zmq.LINGER, 0)
        self.broker.setsockopt(zmq.IDENTITY, V1_DOOR_ID)
        self.broker.connect(broker_address)
        # Ids from the clock (microseconds), so that a restarted door never reuses one its predecessor
        # still has a reply coming for.
        self.ids = itertools.count(time.time_ns() // 1000)
        self.waiting: dict[int, Waiting] = {}
        self.subscribed: set[bytes] = set()
        self.held: dict[bytes, Held] = {}
        self.held_bytes, self.max_held_bytes = 0, HELD_PER_REQUEST_BYTES * config.max_request_bytes
        self.evicted_log = LogLimiter(log)
        self.max_seq_len: int | None = None
        self.stopping = False
        self.foreign_logged = 0.0
        # A client can send bad requests (or TERMINATION) as fast as the door reads: a line per 10 s of each.
        self.bad_request_log, self.termination_log = LogLimiter(log), LogLimiter(log)
        self.foreign_count = 0

    def bind(self) -> None:
        host = self.config.host
        for socket, port in ((self.pull, self.config.v1_port), (self.publish, self.config.v1_port_out)):
            socket.bind(f"tcp://{host}:{port}")

    # ------------------------------------------------------------ the loop

    def serve(self) -> None:
        poller = zmq.Poller()
        for socket in (self.pull, self.publish, self.broker):
            poller.register(socket, zmq.POLLIN)
        while not self.stopping:
            events = dict(poller.poll(POLL_MS))
            if self.publish in events:
                self.drain(self.publish, self.on_subscription)
            if self.broker in events:
                self.drain(self.broker, self.on_broker_reply)
            if self.pull in events:
                self.drain(self.pull, self.on_request)
            self.flush_held(time.monotonic())
        self.finish()

    @staticmethod
    def drain(socket: zmq.Socket, handler, limit: int = 1000) -> None:
        for _ in range(limit):
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                handler(frames)
            except Exception:  # a safety net: no message may take the door down with it
                log.exception("unexpected error in the v1 door")

    def finish(self) -> None:
        """After SIGTERM: publish what the broker already answered (it stops the doors last), then close."""
        deadline = time.monotonic() + STOP_DRAIN
        while self.waiting and time.monotonic() < deadline:
            if self.broker.poll(POLL_MS):
                self.drain(self.broker, self.on_broker_reply)
        self.flush_held(time.monotonic())
        for socket in (self.pull, self.publish, self.broker):
            socket.close(linger=0)
        self.context.term()

    # ------------------------------------------------------------ clients in

    def on_subscription(self, frames: list) -> None:
        # XPUB passes up b"\x01" + topic on subscribe and b"\x00" + topic when the last subscriber leaves.
        message = frames[0].bytes
        if message[:1] == b"\x01":
            self.subscribed.add(message[1:])
        elif message[:1] == b"\x00":
            self.subscribed.discard(message[1:])
            self.forget(message[1:])

    def on_request(self, frames: list) -> None:
        parts = [f.bytes for f in frames]
        if len(parts) != 4 or not 0 < len(parts[0]) <= MAX_IDENTITY_BYTES or not parts[2].isdigit():
            self.log_foreign(parts)  # nowhere to send a reply: no readable identity or request id
            return
        identity, msg, request_id = parts[0], parts[1], parts[2]
        if msg == TERMINATION:
            self.termination_log.warning("ignored TERMINATION from a 2019 client (%r): a network peer cannot stop "
                                         "this server; stop it with SIGTERM or Ctrl-C",
                                         identity[:40].decode("utf-8", "replace"))
        elif msg in (SHOW_CONFIG, SHOW_STATUS):
            self.ask_broker(Waiting(identity, request_id, msg), "config" if msg == SHOW_CONFIG else "status")
        else:
            try:
                texts, is_tokenized = parse_texts(msg)
                self.ask_broker(Waiting(identity, request_id, b"ENCODE"), "encode", texts, is_tokenized)
            except V1Error as e:
                self.bad_request_log.warning("bad request from a 2019 client (%r): %s",
                                             identity[:40].decode("utf-8", "replace"), e)
                self.send(encode_error_reply(identity, request_id, "bad_request", str(e)))
            except Exception as e:  # a bug here must not leave a client waiting forever (its default timeout)
                log.exception("a 2019 request failed in the door")
                self.send(encode_error_reply(identity, request_id, "server_error", f"internal error: {e}"))

    def ask_broker(self, waiting: Waiting, cmd: str, texts: list | None = None, is_tokenized: bool = False) -> None:
        request_id = next(self.ids)
        tenant = "v1:" + waiting.identity[:40].decode("utf-8", "replace")
        # The 2019 client asks for tokens only on its side (check_token_info): always send them.
        echo = json.dumps([waiting.identity.hex(), waiting.request_id.decode("ascii")]) if texts is not None else None
        frames = pack_request(request_id, cmd, texts, is_tokenized=is_tokenized, show_tokens=texts is not None,
                              tenant=tenant, echo=echo)
        self.waiting[request_id] = waiting
        self.broker.send_multipart(frames, copy=False)

    def log_foreign(self, parts: list[bytes]) -> None:
        self.foreign_count += 1
        now = time.monotonic()
        if now - self.foreign_logged < FOREIGN_LOG_INTERVAL:
            return
        shape = ", ".join(f"{len(p)} bytes" for p in parts[:6])
        log.warning("%d message(s) on -v1_port %s that are not the 2019 protocol ([identity, msg, request id, "
                    "length]; this one has %d frame(s): %s) were dropped; our own BertClient connects to "
                    "-port %s instead", self.foreign_count, self.config.v1_port, len(parts), shape, self.config.port)
        self.foreign_logged, self.foreign_count = now, 0

    # ------------------------------------------------------------ replies out

    def on_broker_reply(self, frames: list) -> None:
        try:
            header = unpack_reply_header(frames[0].bytes)
        except ProtocolError as e:  # the broker is ours: a bug, not an attack
            log.error("unreadable reply from the broker: %s", e)
            return
        waiting = self.waiting.pop(header.get("id"), None)
        if waiting is None:
            waiting = waiting_from_echo(header.get("echo"))
            if waiting is None:
                return
            log.info("passing on the reply to request %s of a 2019 client (%s), asked before this door restarted",
                     waiting.request_id.decode(), waiting.identity[:40].decode("utf-8", "replace"))
        identity, request_id = waiting.identity, waiting.request_id
        if waiting.kind == b"ENCODE":
            if header.get("ok"):
                reply = vectors_reply(identity, request_id, header, frames[1:])
            else:
                reply = encode_error_reply(identity, request_id, str(header.get("error")),
                                           str(header.get("message", "the server could not encode the request")))
        else:
            if not header.get("ok"):
                result = error_config(str(header.get("message", "the server could not answer")))
            else:
                result = self.describe(header, identity) if waiting.kind == SHOW_CONFIG else header.get("result")
            reply = [identity, json.dumps(result, ensure_ascii=False).encode("utf-8"), request_id]
        self.send(reply)

    def describe(self, header: dict, identity: bytes) -> dict:
        described = dict(header.get("result") or {})
        if described.get("max_seq_len") is None:  # no worker has loaded the model yet: what it will use
            described["max_seq_len"] = self.resolved_max_seq_len()
        return config_reply(described, self.config, identity)

    def resolved_max_seq_len(self) -> int | None:
        if self.max_seq_len is None:
            try:
                from bert.resolve import resolve_encoder  # the model's files, not its weights; never torch
                self.max_seq_len = resolve_encoder(self.config.encoder).max_seq_len
            except Exception as e:
                log.warning("cannot tell the 2019 client max_seq_len before a worker is ready: %s", e)
        return self.max_seq_len

    def send(self, reply: list) -> None:
        """Publish now if the client has subscribed and its pipe has room; else hold the reply."""
        identity = reply[0]
        held = self.held.get(identity)
        if held is not None or not self.try_publish(reply):
            if held is None:
                held = self.held[identity] = Held(time.monotonic())
            size = reply_bytes(reply)
            held.replies.append(reply)
            held.size += size
            self.held_bytes += size
            if self.held_bytes > self.max_held_bytes:
                self.evict()

    def evict(self) -> None:
        """Drop the oldest replies of the clients holding the most until the rest fit the cap."""
        while self.held_bytes > self.max_held_bytes:
            hog = max(self.held, key=lambda identity: self.held[identity].size)
            held, dropped = self.held[hog], 0
            while held.replies and self.held_bytes > self.max_held_bytes:
                self.pop_oldest(held)
                dropped += 1
            if not held.replies:
                del self.held[hog]
            self.evicted_log.warning("dropped %d replies to a 2019 client (%r) that %s: replies held for all "
                                     "clients together are capped at %.3g MB (%d x -max_request_bytes)", dropped,
                                     hog[:40].decode("utf-8", "replace"),
                                     "reads too slowly" if hog in self.subscribed else "did not subscribe",
                                     self.max_held_bytes / 1e6, HELD_PER_REQUEST_BYTES)

    def pop_oldest(self, held: Held) -> list:
        """A client's oldest held reply, taken out of the counts."""
        reply = held.replies.popleft()
        size = reply_bytes(reply)
        held.size -= size
        self.held_bytes -= size
        return reply

    def forget(self, identity: bytes) -> None:
        held = self.held.pop(identity, None)
        if held is not None:
            self.held_bytes -= held.size

    def try_publish(self, reply: list) -> bool:
        if reply[0] not in self.subscribed:
            return False
        try:
            self.publish.send_multipart(reply, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:  # that subscriber's pipe is full (XPUB_NODROP): keep it for later
            return False

    def flush_held(self, now: float) -> None:
        for identity in list(self.held):
            held = self.held[identity]
            while held.replies and self.try_publish(held.replies[0]):
                self.pop_oldest(held)
                held.since = now
            if not held.replies:
                del self.held[identity]
                continue
            subscribed = identity in self.subscribed
            limit = HOLD_FOR_READER if subscribed else HOLD_FOR_SUBSCRIPTION
            if now - held.since > limit:
                log.warning("dropped %d replies to a 2019 client (%s) that %s for %.0f s", len(held.replies),
                            identity[:40].decode("utf-8", "replace"),
                            "read none" if subscribed else "did not subscribe to -v1_port_out", limit)
                self.forget(identity)


# ---------------------------------------------------------------- the process


def serve(config: ServerConfig, broker_address: str, ready: Any) -> None:
    """The door's entry point (see `service/doors.py`): bind, say ready, serve until SIGTERM."""
    door = V1Door(config, broker_address)
    try:
        door.bind()
    except zmq.ZMQError as e:
        log.error("cannot listen for the 2019 protocol on ports %s and %s: %s", config.v1_port, config.v1_port_out, e)
        sys.exit(1)

    def stop(_signum: int, _frame: Any) -> None:
        door.stopping = True

    signal.signal(signal.SIGTERM, stop)
    ready.set()
    host = "127.0.0.1" if config.host in ("*", "0.0.0.0") else config.host
    log.info("2019 protocol on ports %d and %d: bert-serving-client uses BertClient(ip='%s', port=%d, port_out=%d)",
             config.v1_port, config.v1_port_out, host, config.v1_port, config.v1_port_out)
    door.serve()

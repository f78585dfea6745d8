"""Intake: a request's bytes to queued jobs, without ever stalling the broker's poll loop.

The broker checks what is cheap before touching any content: frame sizes (the whole message
within -max_request_bytes, the header within MAX_HEADER_BYTES) and the small header. The texts
frame is parsed item by item, stopping as soon as it holds more than -max_client_batch_size
items, then the items are validated, split into jobs and re-encoded. Small texts frames
(INLINE_PARSE_BYTES, 16 KB) are done in the loop: about 10 ms at worst. Larger ones go to
an intake process (one per server, started and restarted by the broker) and come back as jobs,
so a 60 MB request costs the loop only the time to pass two messages on.

    broker ──ROUTER──ipc──DEALER── intake process
           [key, json {is_tokenized, max_sentences, max_batch_size, max_seq_len}, texts]  ->
           <-  [key, json {ok: true, chunks: [[sentences, tokens], ...]}, payload, payload, ...]
           <-  [key, json {ok: false, message}]
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable

import zmq

from .client import BadRequestError, check_texts
from .link import PolledByFd
from .scheduler import estimate_tokens, split

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 8192          # a real header is under 200 bytes
INLINE_PARSE_BYTES = 16 * 1024   # texts frames parsed in the loop: at worst ~10 ms (4,000 one-letter strings)
RESTART_INTERVAL = 1.0           # seconds between starts of an intake process that keeps dying
INTAKE_BACKLOG_REQUESTS = 2      # x -max_request_bytes: bytes waiting for the intake process before "busy"

TOO_MANY = object()  # what `_read_array` returns for an array over the limit
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


# ---------------------------------------------------------------- checks and parsing (pure)


def check_sizes(sizes: list[int], max_bytes: int) -> None:
    """Refuse a message by its frame sizes alone, before any content is read."""
    if not sizes:
        raise BadRequestError("empty message")
    total = sum(sizes)
    if total > max_bytes:
        raise BadRequestError(f"request of {total} bytes is over the server's limit of {max_bytes} bytes "
                              "(-max_request_bytes)")
    if sizes[0] > MAX_HEADER_BYTES:
        raise BadRequestError(f"header frame of {sizes[0]} bytes is over the limit of {MAX_HEADER_BYTES} bytes")


def peek_id(header: bytes) -> Any:
    """The request id, if the header is readable at all, so even an error reply can be matched."""
    value = _json_or_none(header)
    value = value.get("id") if isinstance(value, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _json_or_none(frame: bytes) -> Any:
    try:
        return json.loads(frame)
    except Exception:
        return None


def parse_texts(frame: bytes | memoryview, is_tokenized: bool, max_sentences: int) -> list:
    """The texts frame as a checked list; raise BadRequestError. A JSON array is read item by item
    and refused as soon as it holds more than `max_sentences` items, before any is validated, so
    15 million one-letter strings cost no more than `max_sentences` of them."""
    try:
        text = bytes(frame).decode("utf-8")
        value = _read_array(text, max_sentences) if text.lstrip(" \t\n\r").startswith("[") else json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: "[[[[..."
        raise BadRequestError(f"texts frame is not UTF-8 JSON ({e})") from None
    except IndexError:
        raise BadRequestError("texts frame is not UTF-8 JSON (it ends inside the array)") from None
    if value is TOO_MANY:
        raise BadRequestError(f"request of more than {max_sentences} sentences is over the server's limit of "
                              f"{max_sentences} (-max_client_batch_size); split it or use encode_async")
    return check_texts(value, is_tokenized)


def _read_array(text: str, max_items: int) -> list | object:
    """A JSON array's items, or TOO_MANY as soon as there are more than `max_items`."""
    items: list = []
    i = _WHITESPACE.match(text, text.index("[") + 1).end()
    if text[i] == "]":
        i += 1
    else:
        while True:
            value, i = _DECODER.raw_decode(text, i)
            items.append(value)
            if len(items) > max_items:
                return TOO_MANY
            i = _WHITESPACE.match(text, i).end()
            if text[i] == "]":
                i += 1
                break
            if text[i] != ",":
                raise ValueError(f"expected ',' or ']' at char {i}")
            i = _WHITESPACE.match(text, i + 1).end()
    if _WHITESPACE.match(text, i).end() != len(text):
        raise ValueError(f"extra data at char {i}")
    return items


def prepare(frame: bytes | memoryview, options: dict) -> list[tuple[bytes, int, int]]:
    """A texts frame as jobs: [(JSON payload, sentences, estimated tokens)]; raise BadRequestError."""
    is_tokenized = options["is_tokenized"]
    texts = parse_texts(frame, is_tokenized, options["max_sentences"])
    chunks = split(texts, options["max_batch_size"])
    # One job (most requests): the client's own JSON, checked above, is its payload as it came.
    payloads = [bytes(frame)] if len(chunks) == 1 else [json.dumps(c, ensure_ascii=False).encode("utf-8") for c in chunks]
    return [(payload, len(chunk), sum(estimate_tokens(t, is_tokenized, options["max_seq_len"]) for t in chunk))
            for payload, chunk in zip(payloads, chunks)]


# ---------------------------------------------------------------- the intake process


def intake_main(address: str, identity: bytes, parent_pid: int, verbose: bool) -> None:
    """Entry point of the intake process (started with 'spawn'): parse, check and split big
    requests until the broker says STOP or dies."""
    from .doors import _die_with_parent
    from .logs import configure_logging

    _die_with_parent(parent_pid)
    # Ctrl-C, or a service manager's SIGTERM, reaches the whole group: the broker decides, and stops
    # this process with STOP (or its death does, through PDEATHSIG).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(verbose)
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.IDENTITY, identity)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(address)
    socket.send(b"READY")
    while True:
        frames = socket.recv_multipart(copy=False)
        if len(frames) != 3:
            break  # STOP
        socket.send_multipart(answer(*frames), copy=False)
        del frames  # a 60 MB request is not kept until the next one arrives
    socket.close(linger=0)
    context.term()


def answer(key: zmq.Frame, options: zmq.Frame, texts: zmq.Frame) -> list:
    try:
        chunks = prepare(texts.buffer, json.loads(options.bytes))
    except BadRequestError as e:
        return [key, json.dumps({"ok": False, "message": str(e)}).encode()]
    meta = {"ok": True, "chunks": [[size, tokens] for _, size, tokens in chunks]}
    return [key, json.dumps(meta).encode(), *(payload for payload, _, _ in chunks)]


@dataclass(eq=False)
class Pending:
    request: Any
    size: int


class IntakeProcess:
    """The broker's side: one ROUTER socket on ipc in the broker's private folder, the process,
    and the requests it holds. `on_done(request, chunks | None, error | None)` gets each result."""

    def __init__(self, context: zmq.Context, runtime_dir: str, max_request_bytes: int, verbose: bool,
                 mp: Any, on_done: Callable) -> None:
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.address = f"ipc://{runtime_dir}/intake"
        self.socket.bind(self.address)
        # What the broker polls: most queries never use this process, so its socket costs no system
        # calls at their turns; an answer is awaited while requests are out, and READY before it.
        self.polled = PolledByFd(self.socket, lambda: bool(self.pending) or not self.ready)
        self.max_backlog = INTAKE_BACKLOG_REQUESTS * max_request_bytes
        self.verbose = verbose
        self.mp = mp
        self.on_done = on_done
        self.process: Any = None
        self.identity = b""
        self.ready = False
        self.waiting: list[list] = []     # messages held until the process says READY (ROUTER drops them before)
        self.generation = 0
        self.pending: dict[bytes, Pending] = {}
        self.backlog = 0
        self.keys = iter(range(1, 1 << 62))
        self.restarts = 0
        self.started = 0.0

    def start(self) -> None:
        self.generation += 1
        self.identity = f"intake.{self.generation}.{os.getpid()}".encode()
        self.ready = False
        self.started = time.monotonic()
        self.process = self.mp.Process(target=intake_main, name="intake", daemon=True,
                                       args=(self.address, self.identity, os.getpid(), self.verbose))
        self.process.start()

    def has_room(self, size: int) -> bool:
        return self.backlog + size <= self.max_backlog

    def submit(self, request: Any, texts: zmq.Frame, options: dict) -> None:
        """Queue a texts frame for parsing; its result comes to `on_done` from `on_message`."""
        key = next(self.keys).to_bytes(8, "big")
        self.pending[key] = Pending(request, len(texts))
        self.backlog += len(texts)
        self.waiting.append([key, json.dumps(options).encode(), texts])
        self.flush()

    def flush(self) -> None:
        while self.ready and self.waiting:
            self.socket.send_multipart([self.identity, *self.waiting.pop(0)], copy=False)

    def on_message(self, frames: list) -> None:
        if frames[0].bytes != self.identity:
            return  # from a process already replaced
        if len(frames) == 2 and frames[1].bytes == b"READY":
            self.ready = True
            self.flush()
            return
        entry = self.pending.pop(frames[1].bytes, None)
        if entry is None:
            return
        self.backlog -= entry.size
        meta = json.loads(frames[2].bytes)
        if meta["ok"]:
            chunks = [(payload, size, tokens) for payload, (size, tokens) in zip(frames[3:], meta["chunks"])]
            self.on_done(entry.request, chunks, None)
        else:
            self.on_done(entry.request, None, meta["message"])

    def check(self) -> None:
        """Replace a process that died; what it held fails (a request that kills the parser is not retried)."""
        if self.process is None or self.process.exitcode is None:
            return
        if time.monotonic() - self.started < RESTART_INTERVAL:
            return  # one that cannot even start is not restarted in a tight loop
        log.error("the intake process (pid %s) exited with code %s; %d requests fail, restarting it",
                  self.process.pid, self.process.exitcode, len(self.pending))
        pending, self.pending, self.backlog, self.waiting = list(self.pending.values()), {}, 0, []
        self.restarts += 1
        self.start()
        for entry in pending:
            self.on_done(entry.request, None, None)

    def stop(self) -> None:
        if self.process is not None and self.process.exitcode is None:
            try:
                self.socket.send_multipart([self.identity, b"STOP"], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self.process.join(timeout=2)
            if self.process.exitcode is None:
                self.process.kill()
                self.process.join(timeout=2)
        self.socket.close(linger=0)
        self.pending.clear()

"""BertClient: sentence vectors from a running bert-as-service server, in two lines.

    from client import BertClient          # or: from service.client import BertClient
    vectors = BertClient(ip="localhost", port=5555).encode(["abc", "defg", "uwxyz"])

This one file is all a client needs: it imports only the standard library, pyzmq and numpy, so
copy it into any project. It is also the home of the wire protocol; the server imports it.

Wire protocol (version 1), over a ZeroMQ DEALER (client) to ROUTER (server) connection:

    request  frame 0  JSON header  {"v": 1, "id": int, "cmd": "encode" | "config" | "status" | "cancel",
                                    "timeout": seconds | null, "is_tokenized": bool, "show_tokens": bool,
                                    "tenant": str?, "echo": str?}   (tenant: a door's user, for fair
                                    sharing; echo: a door's note, returned in the reply's header)
             frame 1  JSON array of strings (or of arrays of WordPiece strings when is_tokenized);
                      "encode" only. Without is_tokenized an item may also be a pair [A, B] of
                      strings: one input, [CLS] A [SEP] B [SEP], token type 1 for B
    reply    frame 0  JSON header  {"v": 1, "id": int, "ok": true, "dtype": "float32" | "float16",
                                    "shapes": [[n1, dim], [n2, dim], ...], "tokens": [[...], ...]?,
                                    "n_tokens": int?, "echo": str?}   (n_tokens: tokens the model saw)
                                   or {"v": 1, "id": int, "ok": true, "result": {...}}   (config, status)
                                   or {"v": 1, "id": int, "ok": false, "error": code, "message": str,
                                       "echo": str?}
             frames 1..k  raw C-order array bytes, one frame per shape, concatenated in order by the
                      client; shapes of 3 dimensions (pooling NONE) are zero-padded to the longest

"cancel" (one frame) withdraws this connection's request `id`: its work not yet on a worker is
dropped, that on workers finishes, and no reply to `id` comes (nor to the cancel itself: a reply
would carry `id`, which replies are matched by). An id unknown or already answered is ignored.

Nothing is pickled in either direction: vectors travel as raw bytes described by the header.

Exceptions (all importable from this module):

    BertClientError
     ├── BertTimeoutError      no reply in time (also a builtin TimeoutError); the client stays usable
     ├── BadRequestError       the input is wrong (also a ValueError); raised before sending when possible
     ├── ProtocolError         a reply this client cannot understand
     └── ServerError           the server failed the request
          └── ServerBusyError  the server's queue is full; try again later
"""
from __future__ import annotations

import itertools
import json
import math
import numbers
import os
import sys
import time
import uuid
from collections import deque
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import zmq

__all__ = ["BertClient", "BertClientError", "BertTimeoutError", "BadRequestError", "ProtocolError",
           "ServerError", "ServerBusyError"]

PROTOCOL_VERSION = 1
COMMANDS = ("encode", "config", "status", "cancel")  # cancel: the only one never answered
DTYPES = ("float32", "float16")

# Error codes a reply may carry, and the exception each becomes in the client.
ERR_BAD_REQUEST = "bad_request"
ERR_BUSY = "busy"
ERR_SERVER = "server_error"
ERR_TIMEOUT = "timeout"
ERR_UNAVAILABLE = "unavailable"


class BertClientError(Exception):
    """Base class of every error this client raises."""


class BertTimeoutError(BertClientError, TimeoutError):
    """No reply within the timeout: the server is down, unreachable, or overloaded."""


class BadRequestError(BertClientError, ValueError):
    """The input cannot be encoded (wrong type, empty, too large...); the message says why."""


class ProtocolError(BertClientError):
    """A message that does not follow the wire protocol."""


class ServerError(BertClientError):
    """The server could not answer the request; `code` is the protocol's error code."""

    def __init__(self, message: str, code: str = ERR_SERVER) -> None:
        super().__init__(message)
        self.code = code


class ServerBusyError(ServerError):
    """The server's queue is full; the request was refused at once rather than queued."""


# ---------------------------------------------------------------- the protocol


def check_texts(texts: Any, is_tokenized: bool = False) -> list:
    """Return `texts` as a list after checking it is what `encode` accepts; raise BadRequestError."""
    if isinstance(texts, (str, bytes)):
        raise BadRequestError(f"encode() takes a list of strings, not a single {type(texts).__name__}; "
                              "wrap it in a list: encode([text])")
    if not isinstance(texts, (list, tuple)):
        raise BadRequestError(f"encode() takes a list of strings, got {type(texts).__name__}")
    if not texts:
        raise BadRequestError("encode() got an empty list: there is nothing to encode")
    if not is_tokenized and all(type(item) is str for item in texts):
        try:  # plain strings (a query's case); on a lone surrogate, the loop below names the item
            for item in texts:
                item.encode("utf-8")
            return list(texts)
        except UnicodeEncodeError:
            pass
    for i, item in enumerate(texts):
        if is_tokenized:
            if not isinstance(item, (list, tuple)) or not all(isinstance(t, str) for t in item):
                raise BadRequestError(f"with is_tokenized=True every item must be a list of token strings; "
                                      f"item {i} is {_describe(item)}")
            strings = item
        elif is_pair(item):
            strings = item
        elif not isinstance(item, str):
            hint = " (a sentence pair is a list of 2 strings; for tokens, did you mean is_tokenized=True?)" \
                if isinstance(item, (list, tuple)) else ""
            raise BadRequestError(f"every item must be a str or a pair [str, str]; item {i} is {_describe(item)}{hint}")
        else:
            strings = (item,)
        if not all(_is_utf8_encodable(s) for s in strings):
            raise BadRequestError(f"item {i} is not valid Unicode: it holds a lone surrogate (such as '\\ud800')")
    return list(texts)


def is_pair(item: Any) -> bool:
    """A sentence pair: 2 strings in a list or tuple, encoded as BERT's [CLS] A [SEP] B [SEP]."""
    return isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(t, str) for t in item)


def from_numpy(texts: Any) -> Any:
    """A numpy array of strings as the list `check_texts` takes (a 2-D one as a list of rows, each
    then checked as a list would be); anything else unchanged. Arrays of bytes are refused: the
    text's encoding is the caller's to know."""
    if not isinstance(texts, np.ndarray):
        return texts
    if texts.dtype.kind == "S":
        raise BadRequestError("encode() got a numpy array of bytes; decode it to str first "
                              "(e.g. np.char.decode(array, 'utf-8'))")
    if texts.ndim not in (1, 2):
        raise BadRequestError(f"encode() takes a 1-D numpy array of strings, got {texts.ndim} dimensions")
    return texts.tolist()  # numpy str_ items become str


def _is_utf8_encodable(text: str) -> bool:
    # A str can hold lone surrogates (Python's own, or JSON's "\ud800" escape) that no UTF-8 encoder
    # takes: the request could be neither sent nor passed on to a worker.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


# pyzmq's flags are enum.IntFlag members, and `send_multipart` ORs them per frame in enum's Python
# code (an enum object made each time): a query's frames are sent one by one with these plain ints.
_NOBLOCK, _NOBLOCK_MORE = int(zmq.NOBLOCK), int(zmq.NOBLOCK | zmq.SNDMORE)

# `json.dumps(texts, ensure_ascii=False)` builds a new encoder at every call; this one is built once.
_TEXTS_TO_JSON = json.JSONEncoder(ensure_ascii=False).encode


def pack_request(request_id: int, cmd: str, texts: Sequence | None = None, timeout: float | None = None,
                 is_tokenized: bool = False, show_tokens: bool = False, tenant: str | None = None,
                 echo: str | None = None) -> list[bytes]:
    plain_timeout = timeout is None or type(timeout) in (int, float) and math.isfinite(timeout)
    if tenant is None and echo is None and cmd in COMMANDS and type(request_id) is int and plain_timeout \
            and type(is_tokenized) is bool and type(show_tokens) is bool:
        # Formatted by hand, as `pack_vectors` is, for the latency of one-sentence requests.
        frames = [b'{"v": %d, "id": %d, "cmd": "%s", "timeout": %s, "is_tokenized": %s, "show_tokens": %s}' % (
            PROTOCOL_VERSION, request_id, cmd.encode(), b"null" if timeout is None else repr(float(timeout)).encode(),
            b"true" if is_tokenized else b"false", b"true" if show_tokens else b"false")]
    else:
        header: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": request_id, "cmd": cmd, "timeout": timeout,
                                  "is_tokenized": is_tokenized, "show_tokens": show_tokens}
        if tenant is not None:
            header["tenant"] = tenant
        if echo is not None:
            header["echo"] = echo
        frames = [json.dumps(header).encode()]
    if cmd == "encode":
        frames.append(_TEXTS_TO_JSON(texts).encode("utf-8"))
    return frames


def unpack_request(frames: Sequence[bytes], max_sentences: int, max_bytes: int) -> tuple[dict, list | None]:
    """Validate a request's frames; return (header, texts). Raise BadRequestError with the reason.

    Used by the server on bytes from the network, so it checks every field and trusts nothing.
    """
    if not frames:
        raise BadRequestError("empty message")
    size = sum(len(f) for f in frames)
    if size > max_bytes:
        raise BadRequestError(f"request of {size} bytes is over the server's limit of {max_bytes} bytes")
    header = unpack_header(frames[0], len(frames))
    if header["cmd"] != "encode":
        return header, None
    try:
        texts = json.loads(frames[1].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: "[[[[..." nested too deep
        raise BadRequestError(f"texts frame is not UTF-8 JSON ({e})") from None
    texts = check_texts(texts, bool(header.get("is_tokenized", False)))
    if len(texts) > max_sentences:
        raise BadRequestError(f"request of {len(texts)} sentences is over the server's limit of "
                              f"{max_sentences} (-max_client_batch_size); split it or use encode_async")
    return header, texts


def unpack_header(frame: bytes, n_frames: int) -> dict:
    """A request's header frame, checked field by field, and the number of frames its command
    takes; raise BadRequestError. (The server reads the texts frame its own way, item by item.)"""
    header = _load_json_object(frame, "header")
    if header.get("v") != PROTOCOL_VERSION:
        raise BadRequestError(f"protocol version {header.get('v')!r} is not supported (server speaks {PROTOCOL_VERSION})")
    if not isinstance(header.get("id"), int) or isinstance(header.get("id"), bool):
        raise BadRequestError("header field 'id' must be an integer")
    cmd = header.get("cmd")
    if cmd not in COMMANDS:
        raise BadRequestError(f"unknown command {cmd!r} (known: {', '.join(COMMANDS)})")
    timeout = header.get("timeout")
    if timeout is not None and not _is_positive_seconds(timeout):
        raise BadRequestError("header field 'timeout' must be a positive number of seconds or null")
    for flag in ("is_tokenized", "show_tokens"):
        if not isinstance(header.get(flag, False), bool):
            raise BadRequestError(f"header field {flag!r} must be true or false")
    if cmd != "encode" and n_frames != 1:
        raise BadRequestError(f"command {cmd!r} takes 1 frame, got {n_frames}")
    if cmd == "encode" and n_frames != 2:
        raise BadRequestError(f"command 'encode' takes 2 frames (header, texts), got {n_frames}")
    return header


def _is_positive_seconds(value: Any) -> bool:
    # Python's JSON reads NaN, which would never expire, and integers of any size, which break
    # the deadline arithmetic (`time.time() + 10**400` raises OverflowError).
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return 0 < float(value) < math.inf
    except OverflowError:
        return False


def _load_json_object(frame: bytes, what: str) -> dict:
    try:
        value = json.loads(frame.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: "[[[[..." nested too deep
        raise BadRequestError(f"{what} frame is not UTF-8 JSON") from None
    if not isinstance(value, dict):
        raise BadRequestError(f"{what} frame must be a JSON object, got {type(value).__name__}")
    return value


def pack_error(request_id: Any, code: str, message: str, echo: str | None = None) -> list[bytes]:
    header = {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": code, "message": message}
    if echo is not None:
        header["echo"] = echo
    return [json.dumps(header).encode()]


def pack_result(request_id: int, result: dict) -> list[bytes]:
    return [json.dumps({"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result}).encode()]


def pack_vectors(request_id: int, dtype: str, shapes: list, buffers: list, tokens: list | None = None,
                 n_tokens: int | None = None, echo: str | None = None) -> list:
    if tokens is None and echo is None and isinstance(n_tokens, int) and dtype.isalnum() and _all_ints(shapes):
        # Formatted by hand: this is on every reply's path, and json.dumps of a small dict costs
        # 30-50 us on a CPU whose caches a forward pass just emptied.
        text = '{"v": %d, "id": %d, "ok": true, "dtype": "%s", "shapes": %s, "n_tokens": %d}' % (
            PROTOCOL_VERSION, request_id, dtype, shapes, n_tokens)
        return [text.encode(), *buffers]
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "dtype": dtype, "shapes": shapes}
    if tokens is not None:
        header["tokens"] = tokens
    if n_tokens is not None:
        header["n_tokens"] = n_tokens
    if echo is not None:
        header["echo"] = echo
    return [json.dumps(header, ensure_ascii=False).encode("utf-8"), *buffers]


def _all_ints(shapes: list) -> bool:
    return all(type(n) is int for shape in shapes for n in shape)


def unpack_reply_header(frame: bytes) -> dict:
    try:
        header = json.loads(frame.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("reply header is not UTF-8 JSON") from None
    if not isinstance(header, dict) or header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"reply is not protocol version {PROTOCOL_VERSION}: {str(header)[:100]}")
    return header


def raise_for_error(header: dict) -> None:
    if header.get("ok"):
        return
    code, message = header.get("error", ERR_SERVER), str(header.get("message", "unknown error"))
    if code == ERR_BAD_REQUEST:
        raise BadRequestError(message)
    if code == ERR_BUSY:
        raise ServerBusyError(message, code)
    if code == ERR_TIMEOUT:
        raise BertTimeoutError(message)
    raise ServerError(message, code)


def unpack_vectors(header: dict, buffers: Sequence) -> np.ndarray:
    """The reply's arrays joined in order; 3-D parts are zero-padded to the longest sequence."""
    dtype, shapes = header.get("dtype"), header.get("shapes")
    if dtype not in DTYPES or not isinstance(shapes, list) or len(shapes) != len(buffers) or not shapes:
        raise ProtocolError(f"reply header does not describe its {len(buffers)} data frames: {str(header)[:200]}")
    try:
        parts = [np.frombuffer(buf, dtype=dtype).reshape(shape) for buf, shape in zip(buffers, shapes)]
    except (ValueError, TypeError) as e:
        raise ProtocolError(f"reply data does not match its header ({e})") from None
    return join_arrays(parts)


def join_arrays(parts: list) -> np.ndarray:
    """Concatenate row blocks in order; 3-D blocks (per-token vectors) are zero-padded to the longest."""
    if len(parts) == 1:
        return parts[0]
    if parts[0].ndim == 3:
        width = max(p.shape[1] for p in parts)
        parts = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0))) for p in parts]
    return np.concatenate(parts)


# ---------------------------------------------------------------- the client


def _load_curve_keys(server_public_key: str, client_key: str | None) -> tuple[bytes, bytes, bytes]:
    """(server public, client public, client secret) keys for CurveZMQ, from z85 text or key files."""
    if client_key is None:
        raise ValueError("a CurveZMQ client needs client_key, the path of its *.key_secret file")
    import zmq.auth
    if os.path.isfile(server_public_key):
        server_public_key = zmq.auth.load_certificate(server_public_key)[0]
    public, secret = zmq.auth.load_certificate(client_key)
    if secret is None:
        raise ValueError(f"{client_key} holds no secret key (use the .key_secret file)")
    server = server_public_key if isinstance(server_public_key, bytes) else server_public_key.encode()
    return server, public, secret


def _progress(total: int, enabled: bool):
    """A progress bar: tqdm when installed, else a plain line rewritten on stderr."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
        return tqdm(total=total, unit="sent", desc="encode")
    except ImportError:
        return _PlainProgress(total)


class _PlainProgress:
    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        rate = self.done / max(time.monotonic() - self.start, 1e-9)
        sys.stderr.write(f"\rencode: {self.done}/{self.total} sentences ({rate:,.0f}/s)")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")


def check_timeout(timeout: Any) -> float | None:
    """`timeout` as the client keeps it: a positive float of seconds, or None to wait forever.
    Infinity (or an int too large for a float, such as 10**400) also means forever; NaN, zero,
    negative numbers and non-numbers are refused, as no wait could honour them."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds or None, got {_describe(timeout)}")
    try:
        seconds = float(timeout)
    except OverflowError:  # an int past float's range: longer than any wait, or as far below zero
        seconds = math.inf if timeout > 0 else -math.inf
    if math.isnan(seconds) or seconds <= 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, got {_describe(timeout)}")
    return None if seconds == math.inf else seconds


# The longest single poll, in ms: a longer wait polls again (zmq_poll takes a C long, and a wait of
# 1e300 s in ms is no such number). The deadline, not this, decides when a wait is over.
_MAX_POLL_MS = 3_600_000


class BertClient:
    """A connection to a bert-as-service server.

    Args:
        ip, port: where the server listens (its start-up log prints the address).
        timeout: seconds to wait for each reply; None, or math.inf, waits forever. NaN, zero and
            negative numbers raise ValueError (also when set later, `client.timeout = ...`). It is
            sent with each request, as seconds (not a date), so the server gives up on it too (one
            that sets none gets the server's -max_timeout). On timeout a `BertTimeoutError` is raised
            and the client opens a fresh connection: the timed-out request (and any other still in
            flight, an `encode_async` loop's included: its next result raises BertTimeoutError at
            once) is abandoned, never delivered late, and its reply is never read. The client stays
            usable (also across server restarts).
        output_fmt: 'ndarray' (float32 numpy array) or 'list' (List[List[float]], as in 2018).
        server_public_key: the server's CurveZMQ public key (z85 text, or a path to a key file made
            by `python app.py -keygen DIR`), when the server runs with -auth_dir.
        client_key: path to this client's secret key file (`*.key_secret`) for CurveZMQ.
    """

    def __init__(self, ip: str = "localhost", port: int = 5555, timeout: float | None = 60.0,
                 output_fmt: str = "ndarray", server_public_key: str | None = None,
                 client_key: str | None = None) -> None:
        if output_fmt not in ("ndarray", "list"):
            raise ValueError(f"output_fmt must be 'ndarray' or 'list', got {output_fmt!r}")
        self.address = f"tcp://{ip}:{port}"
        self.timeout = timeout
        self.output_fmt = output_fmt
        self._ids = itertools.count(1)
        self._curve_keys = None if server_public_key is None else _load_curve_keys(server_public_key, client_key)
        self._context = zmq.Context()
        self._socket = self._connect()
        # Requests sent on this socket whose replies someone still waits for (an `encode_async`
        # loop's, while an `encode` inside it waits for its own), and those of their replies that
        # came while another was awaited. A reply to any other id is dropped: its wait is over.
        self._outstanding: set[int] = set()
        self._early: dict[int, list] = {}
        self._closed = False

    @property
    def timeout(self) -> float | None:
        """Seconds to wait for each reply, None for ever; checked when set (see `check_timeout`)."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._timeout = check_timeout(value)

    def _connect(self) -> zmq.Socket:
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        # A random identity lets the server tell two clients in one process apart; a new one per
        # socket means the late reply to a request abandoned with the old socket is never routed here.
        socket.setsockopt(zmq.IDENTITY, b"c-" + uuid.uuid4().hex.encode())
        if self._curve_keys is not None:
            socket.curve_serverkey, socket.curve_publickey, socket.curve_secretkey = self._curve_keys
        socket.connect(self.address)
        self._replies = zmq.Poller()  # kept with its socket: `socket.poll()` builds a poller at every call
        self._replies.register(socket, zmq.POLLIN)
        return socket

    def _reconnect(self) -> None:
        """After a timeout, a fresh socket (the ZeroMQ guide's Lazy Pirate): requests the old one still
        queued (to a server that is down, say) are thrown away rather than delivered, stale, when the
        server comes back, and sends never pile up against the queue's limit. Every request in flight
        on this client is abandoned with it."""
        self._socket.close(linger=0)
        self._outstanding.clear()
        self._early.clear()
        self._socket = self._connect()

    # ------------------------------------------------------------ public API

    def encode(self, texts: Sequence, is_tokenized: bool = False, show_tokens: bool = False,
               show_progress: bool = False, batch_size: int = 1024) -> Any:
        """Vectors for `texts`: a float32 ndarray (n, dim), or List[List[float]] with output_fmt='list'.

        texts: a list, tuple or numpy array of strings; an item may also be a sentence pair, a
            list of 2 strings [A, B], encoded as BERT's [CLS] A [SEP] B [SEP] (token type 1 for B).
        is_tokenized: `texts` are lists of WordPiece tokens (the server adds [CLS]/[SEP]).
        show_tokens: return `(vectors, tokens)`, the tokens being what the model saw after truncation.
        show_progress: send in requests of `batch_size` sentences, pipelined, and show progress after
            each (tqdm when installed, else a line on stderr), however few the sentences.
        """
        texts = check_texts(from_numpy(texts), is_tokenized)
        if show_progress:
            if batch_size < 1:
                raise ValueError(f"batch_size must be at least 1, got {batch_size}")
            chunks = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
            bar = _progress(len(texts), True)
            results = []
            try:
                for chunk, result in zip(chunks, self.encode_async(chunks, is_tokenized=is_tokenized,
                                                                   show_tokens=show_tokens)):
                    results.append(result)
                    bar.update(len(chunk))
            finally:
                bar.close()
            return self._join(results, show_tokens)
        request_id = self._send("encode", texts, is_tokenized, show_tokens)
        return self._format(*self._receive(request_id), show_tokens)

    def encode_async(self, batches: Iterable[Sequence], max_in_flight: int = 4, is_tokenized: bool = False,
                     show_tokens: bool = False) -> Iterator[Any]:
        """Encode each list of `batches`, yielding results in order with up to `max_in_flight` requests
        outstanding, so the server never waits for the client between requests. Other calls on this
        client (`encode`, `server_status`...) may be made inside the loop; its replies are kept
        meanwhile."""
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError(f"max_in_flight must be an int of at least 1, got {max_in_flight!r}")
        pending: deque[int] = deque()
        batches = iter(batches)
        sent_on = self._socket
        try:
            while True:
                if pending:  # resumed after a call that timed out: send no more for a loop that is over
                    self._raise_if_abandoned(pending[0])
                while len(pending) < max_in_flight:
                    batch = next(batches, None)
                    if batch is None:
                        break
                    batch = check_texts(from_numpy(batch), is_tokenized)
                    pending.append(self._send("encode", batch, is_tokenized, show_tokens))
                    sent_on = self._socket
                if not pending:
                    return
                yield self._format(*self._receive(pending.popleft()), show_tokens)
        finally:
            # Stopped early (an error, or the caller left the loop): replies to the requests still
            # out are no longer wanted. Those already here are dropped now, later ones on arrival,
            # and the server is told to drop their work not yet encoded. (After a timeout the
            # connection they were sent on is closed, which tells the server as much.)
            for request_id in pending:
                self._abandon(request_id)
            if pending and sent_on is self._socket:
                self._cancel(pending)

    def server_config(self) -> dict:
        """The server's configuration: model, pooling, dimensions, limits."""
        return self._call("config")

    def server_status(self) -> dict:
        """The server's live state: workers, queue, requests served, restarts."""
        return self._call("status")

    def close(self) -> None:
        """Close the connection; safe to call twice."""
        if not self._closed:
            self._closed = True
            self._socket.close(linger=0)
            self._context.term()

    def __enter__(self) -> "BertClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------ internals

    def _call(self, cmd: str) -> dict:
        header, _ = self._receive(self._send(cmd))
        result = header.get("result")
        if not isinstance(result, dict):
            raise ProtocolError(f"reply to {cmd!r} has no result object")
        return result

    def _send(self, cmd: str, texts: Sequence | None = None, is_tokenized: bool = False,
              show_tokens: bool = False) -> int:
        if self._closed:
            raise BertClientError("the client is closed")
        request_id = next(self._ids)
        frames = pack_request(request_id, cmd, texts, self.timeout, is_tokenized, show_tokens)
        self._send_within_timeout(frames)
        self._outstanding.add(request_id)
        return request_id

    def _cancel(self, request_ids: Iterable[int]) -> None:
        """Withdraw requests in flight (`cancel`); best effort, never blocks. (A server older than
        `cancel` answers it as a bad request, with the id of a request no longer waited for: dropped.)"""
        for request_id in request_ids:
            try:
                self._socket.send(pack_request(request_id, "cancel")[0], _NOBLOCK, copy=False)
            except zmq.ZMQError:  # no room or no connection: the server encodes it for nobody, as before
                return

    def _send_within_timeout(self, frames: list) -> None:
        # A DEALER with no connection to send on (a refused CurveZMQ handshake, say) blocks in send, and
        # POLLOUT can turn false between a poll and the send: try without blocking until the deadline.
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            try:
                # As send_multipart does: once the first frame is taken, ZeroMQ takes the whole message.
                for frame in frames[:-1]:
                    self._socket.send(frame, _NOBLOCK_MORE, copy=False)
                self._socket.send(frames[-1], _NOBLOCK, copy=False)
                return
            except zmq.Again:
                pass
            except zmq.ZMQError as e:
                raise BertClientError(f"cannot send to {self.address}: {e}") from None
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                self._reconnect()
                raise BertTimeoutError(f"cannot send to {self.address} within {self.timeout} s: no connection "
                                       "(the server is down or unreachable, or refused this client's keys)")
            if self._socket.poll(100 if wait is None else min(100, int(wait * 1000) + 1), zmq.POLLOUT):
                time.sleep(0.005)  # writable yet refused: the connection is flapping; do not spin

    def _receive(self, request_id: int) -> tuple[dict, list]:
        """Wait for the reply to `request_id`, keeping replies to other outstanding ids and dropping
        those nobody waits for any more (timed out, or of an `encode_async` loop left early)."""
        self._raise_if_abandoned(request_id)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            while request_id not in self._early:
                self._wait_for_a_reply(deadline)
                frames = self._socket.recv_multipart(copy=False)
                header = unpack_reply_header(frames[0].bytes)
                reply_id = header.get("id")
                if type(reply_id) is int and reply_id in self._outstanding:
                    self._outstanding.discard(reply_id)
                    self._early[reply_id] = [header, frames[1:]]
        finally:
            if request_id not in self._early:  # left without it (an error, Ctrl-C): a late reply is dropped
                self._abandon(request_id)
        header, buffers = self._early.pop(request_id)
        raise_for_error(header)
        return header, buffers

    def _wait_for_a_reply(self, deadline: float | None) -> None:
        """Return once a reply can be read; past `deadline`, reconnect and raise BertTimeoutError."""
        while True:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                self._reconnect()
                raise BertTimeoutError(f"no reply from {self.address} within {self.timeout} s: the server is "
                                       "down, unreachable, or still encoding (for large requests to a slow "
                                       "server, raise BertClient(timeout=...))")
            poll_ms = _MAX_POLL_MS if wait is None else min(_MAX_POLL_MS, int(wait * 1000) + 1)
            if self._replies.poll(poll_ms):
                return

    def _raise_if_abandoned(self, request_id: int) -> None:
        if request_id not in self._outstanding and request_id not in self._early:
            # Sent on a socket since replaced: another request on this client timed out meanwhile.
            raise BertTimeoutError(f"request {request_id} was abandoned when another request on this client "
                                   f"timed out (no reply from {self.address} within {self.timeout} s)")

    def _abandon(self, request_id: int) -> None:
        """Nobody waits for this reply any more: drop it if it is here, and on arrival if not."""
        self._outstanding.discard(request_id)
        self._early.pop(request_id, None)

    def _format(self, header: dict, buffers: list, show_tokens: bool) -> Any:
        vectors = unpack_vectors(header, [b.buffer for b in buffers])
        if vectors.dtype != np.float32:
            vectors = vectors.astype(np.float32)
        elif not vectors.flags.writeable:
            vectors = vectors.copy()  # frombuffer views are read-only; callers expect a normal array
        result = vectors.tolist() if self.output_fmt == "list" else vectors
        return (result, header.get("tokens")) if show_tokens else result

    def _join(self, results: list, show_tokens: bool) -> Any:
        if show_tokens:
            vectors = self._concat([r[0] for r in results])
            return vectors, [t for r in results for t in (r[1] or [])]
        return self._concat(results)

    def _concat(self, parts: list) -> Any:
        if self.output_fmt == "list":
            return [row for part in parts for row in part]
        return join_arrays(parts)

"""The HTTP door: OpenAI-compatible embeddings, TEI-style routes, health probe and Prometheus metrics.

    python app.py -http_port 8080
    curl localhost:8080/v1/embeddings -d '{"input": ["hello world"], "model": "any"}'

A door (see `service/doors.py`): a process of its own that is one more client of the broker. It
connects one DEALER to the broker's private door socket and speaks the wire protocol
of `service/client.py`; replies are matched to the waiting HTTP requests by request id. So the
broker's batching, limits, busy answer and worker failover apply to HTTP requests unchanged, and
the broker never learns HTTP.

    route                        auth   answer
    POST /v1/embeddings          key    OpenAI's embeddings response (float or base64), also at /embeddings
    GET  /v1/models              key    the served model, OpenAI's list shape
    POST /embed                  key    TEI: {"inputs", "normalize"?, "truncate"?} -> [[float]]
    POST /tokenize               key    TEI: the tokens the model sees, with ids and character offsets
    GET  /info                   key    TEI-style description: model, dim, max_seq_len, pooling, limits
    GET  /health                 open   200 while at least one worker is ready, else 503
    GET  /metrics                open   Prometheus text, rendered from the broker's own status

Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}` on /v1/* and /embeddings and
TEI's `{"error", "error_type"}` elsewhere; the statuses are in `HttpError`.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import logging
import resource
import signal
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import numpy as np
import orjson
import uvicorn
import zmq
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from .client import (ERR_BAD_REQUEST, ERR_BUSY, ERR_SERVER, ERR_TIMEOUT, ERR_UNAVAILABLE, ProtocolError,
                     pack_request, unpack_reply_header, unpack_vectors)
from .config import ServerConfig
from .metrics import prometheus_text

log = logging.getLogger(__name__)

STATUS_INTERVAL = 1.0   # seconds between the door's looks at the broker's status (is a worker ready?)
STATUS_TIMEOUT = 5.0    # a broker that does not answer `status` within this is reported unhealthy
RETRY_AFTER = "1"       # seconds a refused client (429, 503) is asked to wait; OpenAI's SDKs obey it
KEEP_ALIVE = 75         # seconds an idle connection stays open: longer than load balancers' (60 s)
# Slow or silent clients (slowloris): uvicorn waits forever for a request's head and body, so each
# such connection would hold a socket and its buffers for good.
HEAD_TIMEOUT = 30       # seconds a connection has to deliver a complete request head, from its opening
                        # (or from the first byte of its next request): a client sends its head in one
                        # go, so 30 s is ample on any link (nginx's client_header_timeout is 60 s)
BODY_READ_TIMEOUT = 30  # seconds the body may go without a byte arriving (nginx's client_body_timeout
                        # counts the same way): a slow link still moves data every few seconds
MAX_CONNECTIONS = 1000  # open connections past which a new one is answered 503 and closed: more than a
                        # balancer's pool or hundreds of direct clients keep open, few enough for the
                        # door's memory (and its open-file limit, raised to fit when it can be)
TOKENIZE_CHUNK = 256    # inputs tokenized and serialised at a time by /tokenize: bounds the tokenizer's
                        # objects alive at once to a chunk's, whatever the request's size
STOP_GRACE = 3          # seconds requests in flight get after SIGTERM (the door has 5 before SIGKILL)
# Seconds the door waits for an encode's reply past the request's deadline (-max_timeout) before it
# answers 504 itself (the broker dropped the reply, say): the broker fails a request at its deadline,
# but a job a worker started just before then still runs its forward passes.
REPLY_MARGIN = 30.0
BUNDLED_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
CLIENT_CLOSED_REQUEST = 499  # nginx's code for a client gone before its answer: in the metrics only
OPENAI_ROUTES = ("/v1/", "/embeddings")
OVER_CAPACITY = "bert_serving_over_capacity"  # in scope["state"]: the connection is past MAX_CONNECTIONS

JSON = "application/json"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


# ---------------------------------------------------------------- errors


class HttpError(Exception):
    """An error answer. `kind` is TEI's `error_type`; `code` and `param` fill OpenAI's fields.

    400 the body is not an embeddings request (not JSON or not UTF-8, wrong types, empty, token
        ids, dimensions out of range); 401 missing or wrong API key; 404/405 no such route or
        method; 408 the body stalled (BODY_READ_TIMEOUT); 413 body over -max_request_bytes, more
        inputs than -max_client_batch_size, or a /tokenize answer over -max_client_tokens;
    415 a compressed body (Content-Encoding); 422 understood but refused (unknown encoding_format,
        truncate=false on a too-long input, text the broker refuses); 429 queue full (Retry-After);
    503 no worker ready, shutting down, or MAX_CONNECTIONS open (Retry-After); 500 encoding failed;
        501 per-token vectors (pooling NONE); 504 timeout.
    """

    def __init__(self, status: int, message: str, kind: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def response(self, openai_style: bool) -> Response:
        if openai_style:
            body: dict[str, Any] = {"error": {"message": self.message, "type": _openai_type(self.status),
                                              "param": self.param, "code": self.code}}
        else:
            body = {"error": self.message, "error_type": self.kind}
        headers = {}
        if self.status in (429, 503):
            headers["Retry-After"] = RETRY_AFTER
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if self.status in (500, 501):
            # OpenAI's SDKs retry 5xx unless told not to; these fail again (the broker already retried
            # an encoding on other workers). 503 and 504 stay retryable, as 408 and 429 are.
            headers["x-should-retry"] = "false"
        if self.status == 408:
            headers["Connection"] = "close"  # the body's remainder is not read: the connection is unusable
        return Response(orjson.dumps(body), self.status, headers, media_type=JSON)


def _openai_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


# The broker's error codes as HTTP answers: (status, TEI error_type, OpenAI code).
BROKER_ERRORS = {
    ERR_BAD_REQUEST: (422, "validation", "invalid_input"),
    ERR_BUSY: (429, "overloaded", "server_busy"),
    ERR_UNAVAILABLE: (503, "unhealthy", "unavailable"),
    ERR_TIMEOUT: (504, "backend", "timeout"),
    ERR_SERVER: (500, "backend", "encoding_failed"),
}


def broker_error(header: dict) -> HttpError:
    """The HTTP error for a broker's error reply (an unknown code is a 500)."""
    status, kind, code = BROKER_ERRORS.get(header.get("error"), BROKER_ERRORS[ERR_SERVER])
    return HttpError(status, str(header.get("message", "the server could not encode the request")), kind, code)


def no_worker_ready(reason: str = "no worker is ready: the model is still loading or its workers "
                                  "are restarting; retry shortly") -> HttpError:
    return HttpError(503, reason, "unhealthy", "no_worker_ready")


# ---------------------------------------------------------------- the request body


def input_texts(value: Any, field: str) -> list[str]:
    """`input` (OpenAI) or `inputs` (TEI) as a list of strings: a string, or an array of them."""
    if isinstance(value, str):
        return [value]
    if value is None:
        raise HttpError(400, f"'{field}' is required: a string or an array of strings", "validation",
                        "missing_input", field)
    if not isinstance(value, list):
        raise HttpError(400, f"'{field}' must be a string or an array of strings, got {_json_type(value)}",
                        "validation", "invalid_type", field)
    if not value:
        raise HttpError(400, f"'{field}' is an empty array: there is nothing to embed", "empty", "empty_input", field)
    if all(isinstance(item, str) for item in value):
        return value
    if all(_is_int(item) or isinstance(item, list) and item and all(_is_int(t) for t in item) for item in value):
        raise HttpError(400, f"'{field}' holds token ids, but this server takes text: send strings (its "
                             "tokenizer is the model's own, not tiktoken). LangChain's OpenAIEmbeddings sends "
                             "token ids unless created with check_embedding_ctx_length=False.",
                        "validation", "token_ids_not_supported", field)
    index = next(i for i, item in enumerate(value) if not isinstance(item, str))
    raise HttpError(400, f"'{field}[{index}]' must be a string, got {_json_type(value[index])}", "validation",
                    "invalid_type", field)


def _not_json(body: bytes, error: orjson.JSONDecodeError) -> str:
    """Why the body is not JSON. orjson calls any bad UTF-8 "surrogates not allowed": say where it is."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        return (f"the body is not valid UTF-8 (byte 0x{body[e.start]:02x} at offset {e.start}): JSON must be "
                "sent as UTF-8")
    return f"the body is not valid JSON: {error}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def optional_flag(body: dict, field: str, default: bool) -> bool:
    value = body.get(field)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise HttpError(400, f"'{field}' must be true or false, got {_json_type(value)}", "validation",
                        "invalid_type", field)
    return value


def optional_string(body: dict, field: str) -> str | None:
    """A field that is a string when given: null or missing is None, any other type a 400."""
    value = body.get(field)
    if value is not None and not isinstance(value, str):
        raise HttpError(400, f"'{field}' must be a string, got {_json_type(value)}", "validation", "invalid_type",
                        field)
    return value


def optional_dimensions(body: dict) -> int | float | None:
    """OpenAI's `dimensions`: an integer, or a float only where the JSON integer was too large for 64
    bits (the JSON parser then gives a float), so that the range check says what is wrong."""
    value = body.get("dimensions")
    if value is None or _is_int(value) or isinstance(value, float) and value.is_integer() and abs(value) >= 2 ** 63:
        return value
    raise HttpError(400, f"'dimensions' must be an integer, got {_json_type(value)}", "validation", "invalid_type",
                    "dimensions")


def tenant_of(request: Request, user: str | None) -> str:
    """Who a request is, for the broker's fair sharing: OpenAI's `user` (the end user's id) when
    given, else the client's address. A load balancer in front makes every client one address:
    give `user` there. The two are named apart ("http-user:", "http-addr:"), so no `user` can
    pass for a client address and take its share."""
    if user:
        name = "http-user:" + user
        # a long id is hashed (the tenant stays short), into a namespace of its own so no short id can equal it
        return name if len(name) <= 64 else "http-user-sha256:" + hashlib.sha256(user.encode()).hexdigest()[:32]
    return "http-addr:" + (request.client.host if request.client else "unknown")


# ---------------------------------------------------------------- vectors out


def truncate_dimensions(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """The first `dimensions` values of each vector, L2-normalised again (OpenAI's `dimensions`)."""
    return l2_normalize(vectors[:, :dimensions])


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


def openai_body(vectors: np.ndarray, encoding_format: str, model: str, n_tokens: int) -> bytes:
    """OpenAI's embeddings response; base64 is each vector's little-endian float32 bytes."""
    if encoding_format == "base64":
        data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(row.tobytes()).decode("ascii")}
                for i, row in enumerate(vectors)]
    else:
        data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(vectors)]
    return orjson.dumps({"object": "list", "data": data, "model": model,
                         "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}},
                        option=orjson.OPT_SERIALIZE_NUMPY)


def token_list(text: str, encoding: Any) -> list[dict]:
    """TEI's /tokenize entries for one text: id, text (the span of the input), special, start, stop
    (character offsets; null for [CLS]/[SEP]), plus `token`, the WordPiece itself."""
    entries = []
    for token_id, token, special, (start, stop) in zip(encoding.ids, encoding.tokens,
                                                       encoding.special_tokens_mask, encoding.offsets):
        if special:
            entries.append({"id": token_id, "text": token, "special": True, "start": None, "stop": None,
                            "token": token})
        else:
            entries.append({"id": token_id, "text": text[start:stop], "special": False, "start": start,
                            "stop": stop, "token": token})
    return entries


def tokenize_reply(tokenizer: Any, texts: list[str], add_special_tokens: bool, max_tokens: int) -> bytes:
    """TEI's /tokenize answer as JSON bytes, built chunk by chunk (a thread's work: ~1 s and ~75 bytes
    of JSON per token at the cap). Raises HttpError 413 once the tokens pass `max_tokens`, before
    more is built: the answer's size is bounded, not just the request's."""
    parts, total = [], 0
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = texts[start:start + TOKENIZE_CHUNK]
        encodings = tokenizer.encodings(chunk, add_special_tokens)
        total += sum(len(e.ids) for e in encodings)
        if total > max_tokens:
            raise HttpError(413, f"the inputs come to more than the server's limit of {max_tokens} tokens for "
                                 "one /tokenize request (-max_client_tokens); split the request", "validation",
                            "too_many_tokens", "inputs")
        parts.extend(orjson.dumps(token_list(t, e)) for t, e in zip(chunk, encodings))
    return b"[" + b",".join(parts) + b"]"


def model_id(config: ServerConfig) -> str:
    """The served model's name, as /v1/models lists it: the folder's name (the bundled model's hub id)."""
    if config.encoder.model_dir is None:
        return BUNDLED_MODEL_ID
    return Path(config.encoder.model_dir).expanduser().resolve().name


def package_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("bert-as-service")
    except PackageNotFoundError:  # run from a checkout
        return None


# ---------------------------------------------------------------- the broker connection


class BrokerLink:
    """One DEALER to the broker's door socket; each call waits for the reply carrying its id.

    A plain socket read from the event loop's own callback on ZeroMQ's file descriptor, not
    `zmq.asyncio`: its reader task and per-message futures cost ~0.4 ms per request on 2 cores (a
    one-sentence request through this link took 5.0 ms against 4.6 ms through `BertClient`).
    ZeroMQ's descriptor only says "something changed" (edge-triggered), so every wake-up and every
    send is followed by reading until the socket's EVENTS show nothing left."""

    SEND_RETRY = 0.001  # seconds between tries while the pipe to the broker is full (a burst of requests)
    CANCEL_TRIES = 1000  # a cancel finds the pipe full: tried again every SEND_RETRY, this many times at most

    def __init__(self, address: str) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.socket.getsockopt(zmq.FD), self.read_replies)
        self.read_replies()  # what came before the reader was added raises no new edge

    async def call(self, cmd: str, texts: list | None = None, tenant: str | None = None,
                   max_bytes: int | None = None, timeout: float | None = None,
                   gone: asyncio.Future | None = None) -> tuple[dict, list]:
        """(reply header, data frames). Raises HttpError 413 when the message would be over `max_bytes`,
        asyncio.TimeoutError when no reply came within `timeout` seconds, and ClientDisconnect once
        `gone` is done (the HTTP client left). An encode given up on so, or whose task is cancelled,
        is withdrawn from the broker (`cancel`), which drops its work not yet on a worker."""
        request_id = next(self.ids)
        frames = pack_request(request_id, cmd, texts, tenant=tenant)
        if max_bytes is not None and sum(len(f) for f in frames) > max_bytes:
            raise HttpError(413, f"the texts take more than the server's limit of {max_bytes} bytes "
                                 "(-max_request_bytes); split the request", "validation", "request_too_large")
        deadline = None if timeout is None else self.loop.time() + timeout
        future = self.loop.create_future()
        self.waiting[request_id] = future
        sent = False
        try:
            await self.send(frames, deadline, gone)
            sent = True
            self.read_replies()  # the send may have consumed the descriptor's edge for a reply that came
            if not future.done():
                await asyncio.wait((future,) if gone is None else (future, gone), return_when=asyncio.FIRST_COMPLETED,
                                   timeout=None if deadline is None else max(0.0, deadline - self.loop.time()))
            if future.done():
                return future.result()
            raise ClientDisconnect() if gone is not None and gone.done() else asyncio.TimeoutError()
        except BaseException:  # given up on, or cancelled (the door stopping): no one will read the reply
            if sent and cmd == "encode" and not future.done():
                self.withdraw(request_id)
            raise
        finally:
            self.waiting.pop(request_id, None)

    async def send(self, frames: list, deadline: float | None, gone: asyncio.Future | None) -> None:
        """Send without blocking the event loop: while the pipe to the broker is full, try again every
        SEND_RETRY seconds, until `deadline` (asyncio.TimeoutError) or `gone` (ClientDisconnect)."""
        while True:
            try:
                self.socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                if deadline is not None and self.loop.time() >= deadline:
                    raise asyncio.TimeoutError() from None
                if gone is not None and gone.done():
                    raise ClientDisconnect() from None
                await asyncio.sleep(self.SEND_RETRY)

    def withdraw(self, request_id: int, tries: int = CANCEL_TRIES) -> None:
        """Tell the broker that no one waits for `request_id` any more (`cancel`: no reply comes).
        Best effort: a cancel that cannot be sent leaves the request to be encoded for nobody."""
        try:
            self.socket.send(pack_request(request_id, "cancel")[0], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            if tries > 1:
                self.loop.call_later(self.SEND_RETRY, self.withdraw, request_id, tries - 1)
        except zmq.ZMQError:  # the socket is closed: the door is stopping, and the broker drops its work
            pass

    def read_replies(self) -> None:
        while self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            try:
                header = unpack_reply_header(frames[0].bytes)
            except ProtocolError as e:  # the broker is ours: a bug, not an attack; every other request goes on
                log.error("unreadable reply from the broker: %s", e)
                continue
            future = self.waiting.get(header.get("id"))
            if future is not None and not future.done():  # else its HTTP request is gone (timed out)
                future.set_result((header, frames[1:]))

    def close(self) -> None:
        if self.loop is not None:
            self.loop.remove_reader(self.socket.getsockopt(zmq.FD))
        self.socket.close(linger=0)
        self.context.term()


# ---------------------------------------------------------------- the door


Handler = Callable[[Request], Awaitable[Response]]


class HttpDoor:
    """The routes, the broker link and what the door knows of the server (workers ready, model)."""

    def __init__(self, config: ServerConfig, broker_address: str) -> None:
        self.config = config
        self.broker_address = broker_address
        self.link: BrokerLink | None = None
        # The door sends no timeout, so the broker's deadline for its requests is -max_timeout.
        self.reply_timeout = config.max_timeout + REPLY_MARGIN
        self.workers_ready = 0
        self.described: dict | None = None    # the broker's `config` reply, once a worker is ready
        self.responses: Counter[tuple[str, int]] = Counter()
        self._tokenizer: Any = None
        self._tokenizer_lock: asyncio.Lock | None = None
        self._watcher: asyncio.Task | None = None

    # ------------------------------------------------------------ the app

    def app(self) -> Callable[..., Awaitable[None]]:
        """The ASGI app uvicorn runs: the routes, or a 503 on a connection over MAX_CONNECTIONS (the
        protocol marks it: see `HeadDeadline`)."""
        routes = [
            self.route("/v1/embeddings", self.openai_embeddings, "POST"),
            self.route("/embeddings", self.openai_embeddings, "POST"),
            self.route("/v1/models", self.openai_models, "GET"),
            self.route("/embed", self.tei_embed, "POST"),
            self.route("/tokenize", self.tei_tokenize, "POST"),
            self.route("/info", self.tei_info, "GET"),
            self.route("/health", self.health, "GET", protected=False),
            self.route("/metrics", self.metrics, "GET", protected=False),
        ]
        starlette = Starlette(routes=routes, lifespan=self.lifespan,
                              exception_handlers={HTTPException: self.unknown_route})
        # '/v1/embeddings/' is a 404 like any unknown path, not a 307 to a URL built from the client's Host
        starlette.router.redirect_slashes = False

        async def app(scope: dict, receive: Callable, send: Callable) -> None:
            if scope["type"] == "http" and scope.get("state", {}).get(OVER_CAPACITY):
                response = await self.refuse_over_capacity(Request(scope, receive))
                await response(scope, receive, send)
            else:
                await starlette(scope, receive, send)

        return app

    async def refuse_over_capacity(self, request: Request) -> Response:
        await _drain(request, self.config.max_request_bytes)
        self.responses["over_capacity", 503] += 1
        response = HttpError(503, f"the server has {MAX_CONNECTIONS} connections open, its limit; retry shortly",
                             "overloaded", "too_many_connections").response(request.url.path.startswith(OPENAI_ROUTES))
        response.headers["Connection"] = "close"
        return response

    def route(self, path: str, handler: Handler, method: str, protected: bool = True) -> Route:
        openai_style = path.startswith(OPENAI_ROUTES)

        async def endpoint(request: Request) -> Response:
            try:
                if protected:
                    self.check_key(request)
                response = await handler(request)
            except HttpError as e:
                if e.status != 408:  # a stalled body is not waited for twice: its connection is closed
                    await _drain(request, self.config.max_request_bytes)
                response = e.response(openai_style)
            except ClientDisconnect:  # nobody reads it; counted as nginx logs it, "client closed request"
                response = Response(status_code=CLIENT_CLOSED_REQUEST)
            except Exception as e:  # a bug in the door: answer 500 and serve on
                log.exception("%s %s failed", request.method, path)
                response = HttpError(500, f"internal error in the HTTP door: {type(e).__name__}: {e}",
                                     "backend", "internal_error").response(openai_style)
            self.responses[path, response.status_code] += 1
            return response

        return Route(path, endpoint, methods=[method])

    async def unknown_route(self, request: Request, exc: HTTPException) -> Response:
        self.responses["unmatched", exc.status_code] += 1
        code = "not_found" if exc.status_code == 404 else "method_not_allowed"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        error = HttpError(exc.status_code, message, "validation", code)
        return error.response(request.url.path.startswith(OPENAI_ROUTES))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):
        self.link = BrokerLink(self.broker_address)
        self.link.start()
        self._tokenizer_lock = asyncio.Lock()
        self._watcher = asyncio.get_running_loop().create_task(self.watch_status())
        try:
            yield
        finally:
            self._watcher.cancel()
            self.link.close()

    # ------------------------------------------------------------ the server's state

    async def status(self) -> dict:
        """The broker's status now; also updates what the door knows (workers ready, the model)."""
        header, _ = await self.link.call("status", timeout=STATUS_TIMEOUT)
        if not header.get("ok"):
            self.workers_ready = 0
            raise no_worker_ready(str(header.get("message", "the server is not serving")))
        status = header["result"]
        self.workers_ready = int(status.get("workers_ready", 0))
        if self.workers_ready and self.described is None:
            reply, _ = await self.link.call("config", timeout=STATUS_TIMEOUT)
            if reply.get("ok") and reply["result"].get("dim"):
                self.described = reply["result"]
        return status

    async def watch_status(self) -> None:
        """Keep `workers_ready` at most STATUS_INTERVAL old, so requests get a 503 at once while no
        worker can take them (at start-up, or while every worker is being replaced)."""
        while True:
            try:
                await self.status()
            except (HttpError, asyncio.TimeoutError):
                self.workers_ready = 0
            except Exception:
                log.exception("asking the broker for its status failed")
            await asyncio.sleep(STATUS_INTERVAL)

    async def require_ready(self) -> dict:
        """The served model's description, or a 503 while no worker is ready."""
        if not self.workers_ready or self.described is None:
            with contextlib.suppress(asyncio.TimeoutError):
                await self.status()  # the last look may be up to a second old
        if not self.workers_ready or self.described is None:
            raise no_worker_ready()
        return self.described

    def check_key(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        given = request.headers.get("authorization")
        if not given:
            raise HttpError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                            "unauthorized", "missing_api_key")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.config.api_key.encode()):
            raise HttpError(401, "invalid API key", "unauthorized", "invalid_api_key")

    # ------------------------------------------------------------ encoding

    async def read_json(self, request: Request) -> dict:
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise HttpError(415, f"the body's Content-Encoding {encoding!r} is not supported: send the JSON "
                                 "uncompressed", "validation", "unsupported_content_encoding")
        body = await _read_body(request, self.config.max_request_bytes)
        if not body.strip():
            raise HttpError(400, "the request has no body: send a JSON object", "validation", "invalid_json")
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise HttpError(400, _not_json(body, e), "validation", "invalid_json") from None
        if not isinstance(value, dict):
            raise HttpError(400, f"the body must be a JSON object, got {_json_type(value)}", "validation",
                            "invalid_json")
        return value

    async def encode(self, texts: list[str], tenant: str, request: Request) -> tuple[np.ndarray, int]:
        """(float32 vectors, tokens the model saw) from the broker, or the HttpError it answered.
        While it waits, a client that disconnects has its request withdrawn from the broker, which
        drops its queued work (ClientDisconnect: no answer is written); and a reply that never comes
        (one the broker dropped) is a 504 once the request's deadline and REPLY_MARGIN have passed."""
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            header, frames = await self.link.call("encode", texts, tenant, self.config.max_request_bytes,
                                                  self.reply_timeout, gone)
        except asyncio.TimeoutError:
            raise HttpError(504, f"the server did not answer within {self.reply_timeout:.0f} s (-max_timeout "
                                 f"plus {REPLY_MARGIN:.0f} s); the request was withdrawn", "backend",
                            "timeout") from None
        finally:
            gone.cancel()
        if not header.get("ok"):
            raise broker_error(header)
        vectors = unpack_vectors(header, [f.buffer for f in frames])
        if vectors.ndim != 2:
            raise HttpError(501, "this server returns per-token vectors (-pooling_strategy NONE); embeddings "
                                 "routes need one vector per input: use BertClient", "backend", "per_token_vectors")
        return vectors.astype("<f4", copy=False), int(header.get("n_tokens", 0))

    async def tokenizer(self) -> Any:
        """The model's tokenizer, loaded on first use (in a thread: it reads the model folder)."""
        async with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = await asyncio.to_thread(load_tokenizer, self.config)
        return self._tokenizer

    # ------------------------------------------------------------ routes

    async def openai_embeddings(self, request: Request) -> Response:
        body = await self.read_json(request)
        texts = input_texts(body.get("input"), "input")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise HttpError(400, f"'model' must be a string, got {_json_type(model)}", "validation", "invalid_type",
                            "model")
        encoding_format = optional_string(body, "encoding_format")
        if encoding_format is None:  # only a missing or null field means the default
            encoding_format = "float"
        if encoding_format not in ("float", "base64"):
            raise HttpError(422, f"'encoding_format' must be 'float' or 'base64', got {encoding_format!r}",
                            "validation", "invalid_encoding_format", "encoding_format")
        dimensions = optional_dimensions(body)
        user = optional_string(body, "user")
        self.check_count(texts, "input")
        dim = (await self.require_ready())["dim"]
        if dimensions is not None and not 1 <= dimensions <= dim:
            raise HttpError(400, f"'dimensions' must be between 1 and the model's {dim}, got {dimensions}",
                            "validation", "invalid_dimensions", "dimensions")
        vectors, n_tokens = await self.encode(texts, tenant_of(request, user), request)
        if dimensions is not None:  # even all of them: normalised again, as said (the model may not normalise)
            vectors = truncate_dimensions(vectors, dimensions)
        return Response(openai_body(vectors, encoding_format, model or model_id(self.config), n_tokens),
                        media_type=JSON)

    async def openai_models(self, request: Request) -> Response:
        started = int(self.described.get("started", 0)) if self.described else 0
        model = {"id": model_id(self.config), "object": "model", "created": started, "owned_by": "bert-as-service"}
        return Response(orjson.dumps({"object": "list", "data": [model]}), media_type=JSON)

    async def tei_embed(self, request: Request) -> Response:
        body = await self.read_json(request)
        texts = input_texts(body.get("inputs"), "inputs")
        normalize = optional_flag(body, "normalize", True)
        truncate = optional_flag(body, "truncate", True)  # TEI started with --auto-truncate: the server's way
        self.check_count(texts, "inputs")  # before any tokenizing for check_lengths
        described = await self.require_ready()
        if not truncate:
            await self.check_lengths(texts, described["max_seq_len"])
        vectors, _ = await self.encode(texts, tenant_of(request, None), request)
        if normalize and not described.get("normalize"):
            vectors = l2_normalize(vectors)
        return Response(orjson.dumps(vectors, option=orjson.OPT_SERIALIZE_NUMPY), media_type=JSON)

    def check_count(self, texts: list[str], field: str) -> None:
        """413 for more inputs than -max_client_batch_size, before any work on them (every route calls
        it before `encode`)."""
        limit = self.config.max_client_batch_size
        if len(texts) > limit:
            raise HttpError(413, f"{len(texts)} inputs are more than the server's limit of {limit} "
                                 "(-max_client_batch_size); split the request", "validation", "too_many_inputs", field)

    async def check_lengths(self, texts: list[str], max_seq_len: int) -> None:
        tokenizer = await self.tokenizer()
        encodings = await asyncio.to_thread(tokenizer.encodings, texts)
        too_long = [i for i, encoding in enumerate(encodings) if encoding.overflowing]
        if too_long:
            raise HttpError(422, f"with truncate=false every input must fit in {max_seq_len} tokens; input "
                                 f"{too_long[0]} does not ({len(too_long)} in all)", "validation", "input_too_long")

    async def tei_tokenize(self, request: Request) -> Response:
        body = await self.read_json(request)
        texts = input_texts(body.get("inputs"), "inputs")
        add_special_tokens = optional_flag(body, "add_special_tokens", True)
        self.check_count(texts, "inputs")
        tokenizer = await self.tokenizer()
        # in a thread: a large answer takes seconds to build, and the other routes go on meanwhile
        reply = await asyncio.to_thread(tokenize_reply, tokenizer, texts, add_special_tokens,
                                        self.config.max_client_tokens)
        return Response(reply, media_type=JSON)

    async def tei_info(self, request: Request) -> Response:
        reply, _ = await self.link.call("config", timeout=STATUS_TIMEOUT)
        if not reply.get("ok"):
            raise broker_error(reply)
        d = reply["result"]  # the encoder's fields appear once a worker has loaded the model
        pooling = "+".join(d["pooling_modes"]) if d.get("pooling_modes") else None
        info = {
            "model_id": model_id(self.config), "model_dir": d.get("model_dir"), "model_dtype": d.get("dtype"),
            "model_type": {"embedding": {"pooling": pooling}}, "dim": d.get("dim"),
            "normalize": d.get("normalize"), "max_input_length": d.get("max_seq_len"), "auto_truncate": True,
            "max_batch_tokens": d.get("max_batch_tokens"), "max_batch_size": self.config.max_batch_size,
            "max_client_batch_size": self.config.max_client_batch_size,
            "max_request_bytes": self.config.max_request_bytes, "max_queue": self.config.max_queue,
            "num_worker": self.config.num_worker, "workers_ready": self.workers_ready,
            "version": package_version(), "protocol_version": d.get("protocol_version"),
        }
        return Response(orjson.dumps(info), media_type=JSON)

    async def health(self, request: Request) -> Response:
        try:
            status = await self.status()
        except asyncio.TimeoutError:
            raise no_worker_ready(f"the broker did not answer within {STATUS_TIMEOUT:.0f} s") from None
        ready, workers = status.get("workers_ready", 0), len(status.get("workers", []))
        if not ready:
            return Response(orjson.dumps({"error": "no worker is ready: the model is still loading or its "
                                                  "workers are restarting", "error_type": "unhealthy",
                                         "workers_ready": 0, "workers": workers,
                                         "starting": status.get("starting")}),
                            503, {"Retry-After": RETRY_AFTER}, media_type=JSON)
        return Response(orjson.dumps({"status": "ok", "workers_ready": ready, "workers": workers}), media_type=JSON)

    async def metrics(self, request: Request) -> Response:
        try:
            status = await self.status()
        except asyncio.TimeoutError:
            raise no_worker_ready(f"the broker did not answer within {STATUS_TIMEOUT:.0f} s") from None
        d = self.described or {}
        info = {"model": model_id(self.config), "dim": d.get("dim"), "max_seq_len": d.get("max_seq_len"),
                "pooling": "+".join(d.get("pooling_modes", [])), "dtype": d.get("dtype"), "device": d.get("device")}
        text = prometheus_text(status, dict(self.responses), {k: v for k, v in info.items() if v})
        return Response(text, media_type=PROMETHEUS)


def load_tokenizer(config: ServerConfig) -> Any:
    """The tokenizer the workers build, from the same resolution of folder and flags (bert.resolve;
    never torch)."""
    from bert.resolve import resolve_encoder

    return resolve_encoder(config.encoder).tokenizer


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes (declared or received)."""
    declared = request.headers.get("content-length", "")
    too_large = HttpError(413, f"the request body is larger than the server's limit of {limit} bytes "
                               "(-max_request_bytes); split the request", "validation", "request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in _body_chunks(request):
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _client_gone(request: Request) -> None:
    """Returns once the HTTP client has disconnected. For a request whose body has been read: the
    ASGI server's next message is then `http.disconnect` (and uvicorn reads the connection while a
    receive waits, so it sees the client close it)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _body_chunks(request: Request) -> AsyncIterator[bytes]:
    """The body as it arrives; a 408 when nothing arrives for BODY_READ_TIMEOUT seconds (a stalled
    or slowloris client would otherwise hold the request, and its connection, for good). A timer
    that cancels this task, not asyncio.wait_for: a chunk already read is then taken without a turn
    of the event loop (wait_for runs the read as a task of its own: +0.4 ms per one-sentence request
    on 2 vCPUs), and asyncio.timeout is Python 3.11's."""
    stream, task, loop = request.stream(), asyncio.current_task(), asyncio.get_running_loop()
    stalled: list[bool] = []

    def stall() -> None:
        stalled.append(True)
        task.cancel()

    try:
        while True:
            timer = loop.call_later(BODY_READ_TIMEOUT, stall)
            try:
                chunk = await anext(stream)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if not stalled:
                    raise
                if hasattr(task, "uncancel"):  # 3.11+: this cancel is handled, the task goes on
                    task.uncancel()
                raise HttpError(408, f"the request body stalled: nothing arrived for {BODY_READ_TIMEOUT} s",
                                "validation", "request_timeout") from None
            finally:
                timer.cancel()
            yield chunk
    finally:
        await stream.aclose()


async def _drain(request: Request, limit: int) -> None:
    """Read what is left of a refused request's body (up to a bound) before answering: a server that
    closes a connection with unread data resets it, and the client may never see the error."""
    if request.method != "POST":
        return
    seen = 0
    with contextlib.suppress(Exception):  # a stream already read, a stall (408), or a client gone: no more
        async for chunk in _body_chunks(request):
            seen += len(chunk)
            if seen > 4 * limit:
                return


# ---------------------------------------------------------------- the process


class HeadDeadline:
    """Mixed into uvicorn's HTTP protocol (httptools or h11: both keep `loop`, `transport`,
    `connections`, `app_state`, and a request's `cycle`, made once its head is in), two limits
    uvicorn lacks:
    - a connection that has not delivered a complete request head HEAD_TIMEOUT seconds after it
      opened, or after the first byte of its next request (keep-alive), is closed;
    - a connection opened while MAX_CONNECTIONS are open is marked in the state each of its requests
      carries (`scope["state"]`): the app answers it 503 and closes it. Refused at its head, not at
      once, so that the client has sent its request and reads the answer rather than a reset."""

    head_timeout: float = HEAD_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self.head_deadline = self.loop.call_later(self.head_timeout, self.head_overdue)
        if len(self.connections) > self.max_connections:
            self.app_state = {**self.app_state, OVER_CAPACITY: True}

    def data_received(self, data: bytes) -> None:
        if self.head_deadline is None and self.between_requests():  # the first bytes of the next request
            self.head_deadline = self.loop.call_later(self.head_timeout, self.head_overdue)
        super().data_received(data)
        if self.head_deadline is not None and not self.between_requests():  # its head is complete
            self.head_deadline.cancel()
            self.head_deadline = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None
        super().connection_lost(exc)

    def between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def head_overdue(self) -> None:
        self.head_deadline = None
        if self.between_requests() and not self.transport.is_closing():
            self.transport.close()


def http_protocol() -> type:
    """The protocol class uvicorn's "auto" picks (httptools where installed, else h11) with `HeadDeadline`."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return type("HeadDeadlineProtocol", (HeadDeadline, AutoHTTPProtocol), {})


def raise_open_file_limit(connections: int) -> None:
    """Let the door hold `connections` sockets beside its own files: a soft limit of 1024 (a common
    default) would turn connections away with failed accepts before MAX_CONNECTIONS refuses them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 1024
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        """SIGTERM (from the broker) stops the door gracefully. SIGINT stays ignored: Ctrl-C reaches
        the whole process group, and the broker decides when its doors stop."""
        previous = signal.signal(signal.SIGTERM, self.handle_exit)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)


def http_host(config: ServerConfig) -> str:
    host = config.http_host or config.host
    return "0.0.0.0" if host == "*" else host


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket. Made with proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on such
    sockets, and without it every response waits ~40 ms for the client's delayed ACK (Nagle)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         proto=socket.IPPROTO_TCP)[0]
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(2048)
    except OSError:
        listener.close()
        raise
    return listener


def serve(config: ServerConfig, broker_address: str, ready: Any) -> None:
    """The door's entry point (see `service/doors.py`): bind, say ready, serve until SIGTERM."""
    host, port = http_host(config), config.http_port
    try:
        listener = listen(host, port)
    except OSError as e:
        log.error("cannot listen for HTTP on %s:%s: %s", host, port, e)
        sys.exit(1)
    if not config.verbose:  # uvicorn's start/stop lines repeat ours
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    door = HttpDoor(config, broker_address)
    raise_open_file_limit(MAX_CONNECTIONS)
    server = _Server(uvicorn.Config(door.app(), http=http_protocol(), log_config=None, access_log=config.verbose,
                                    timeout_keep_alive=KEEP_ALIVE, timeout_graceful_shutdown=STOP_GRACE,
                                    server_header=False))
    ready.set()
    shown = f"[{host}]" if ":" in host else host
    log.info("HTTP on http://%s:%d: OpenAI base_url http://%s:%d/v1, TEI /embed, /health, /metrics%s",
             shown, port, shown, port, " (API key required)" if config.api_key else "")
    server.run(sockets=[listener])

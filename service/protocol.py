"""The broker <-> worker protocol, and the timing constants of both sides.

The client <-> server protocol lives in `service/client.py` (the one file clients copy).
Local workers link to the broker over a Unix socket in its 0700 runtime folder (`service/link.py`:
multipart messages, taken only from the pid of a process the broker spawned). Every message starts
with a command frame:

    worker -> broker   READY     json {pid, device, encoder: {...}}       model loaded, ready for jobs
                       FAILED    json {message}                           could not load the model; exiting
                       HB                                                  heartbeat
                       RESULT    binary (RESULT_HEADER): job, dtype, shape, n_tokens, compute_ms   data
                                 or json {job, ok, dtype, shape, n_tokens, compute_ms, tokens}  data
                                 or json {job, ok: false, error, message}    a job failed
    broker -> worker   JOB       binary (JOB_HEADER): job, seconds_left, is_tokenized, show_tokens   texts
                                 (JSON array: strings and sentence pairs [A, B], or token lists when is_tokenized)
                       HB                                                  heartbeat
                       STOP                                                finish and exit

Workers of other hosts (`app.py -join tcp://HEAD:PORT`) connect to the head's worker port (TCP,
CurveZMQ with `-auth_dir`); their routing id is the one the head's ROUTER gives the connection.
Before READY they introduce themselves, and the head hands them every option that changes a vector:

    worker -> head     HELLO     json {protocol, pid, host, index, restarts, fingerprint: {config, vocab, weights}}
    head -> worker     WELCOME   json {encoder: {pooling_strategy, pooling_layer, ...}, output_dtype}
                       REFUSED   json {message}                           e.g. another model: exit, do not retry
                       HB                                                  while it loads the model
    worker -> head     READY     json {pid, device, encoder, threads, capacity, host, index, restarts}

then as above. READY's `capacity` is how many jobs the worker wants in hand (every worker sends it).
A head that hears from a routing id it does not know (it restarted, or it gave the worker up for
silent) answers STOP: the worker finishes what it holds and says HELLO again on a fresh socket.
"""
from __future__ import annotations

import json
import math
import struct
from typing import Any

READY, FAILED, HEARTBEAT, RESULT = b"READY", b"FAILED", b"HB", b"RESULT"
JOB, STOP = b"JOB", b"STOP"
HELLO, WELCOME, REFUSED = b"HELLO", b"WELCOME", b"REFUSED"
REMOTE_PROTOCOL = 2  # 2: binary JOB and RESULT headers

HEARTBEAT_INTERVAL = 1.0   # seconds between heartbeats, both ways
HEARTBEAT_LIVENESS = 5     # silent intervals before the other side is taken for dead
MAX_JOB_ATTEMPTS = 3       # a job on a worker that died this many times is failed, not retried again
WORKER_PREFETCH_JOBS = 4   # jobs a worker holds at once, so it can merge them into one forward pass
# A query is a whole request in one job of at most this many bytes of texts (about 10 sentences of 20
# words; scheduler.Job.is_query): a worker whose hands are full is given one more, and encodes it ahead
# of bulk jobs. A worker encodes it on its I/O thread at once, beside any bulk pass, and when idle
# any job this small (worker.runs_inline).
QUERY_MAX_BYTES = 2048
RESPAWN_BACKOFF_MAX = 30.0  # seconds; replacements of a worker that keeps dying start ever later
MAX_REMOTE_WORKERS = 1024  # workers of other hosts a head takes; more are refused
MAX_WORKER_CAPACITY = 64   # jobs in hand a worker may ask for in READY; more is cut to this
REJOIN_BACKOFF_MAX = 8.0   # seconds; a worker host that finds no head tries again ever later, up to this


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


# JOB and RESULT headers are on every query's path, read and written on CPU caches the forward pass
# just emptied: there a `json.loads` of a small header costs ~70 us and a `struct.unpack` ~15 us
# (measured after a MiniLM pass on 2 cores), so their fixed fields are packed, little-endian.
JOB_HEADER = struct.Struct("<QdB")  # job id, seconds left (NaN: no deadline), flags
_IS_TOKENIZED, _SHOW_TOKENS, _IS_QUERY = 1, 2, 4  # a worker of an older version ignores the query bit
# A RESULT header is this struct, or a JSON object (a failed job, or one with `tokens`), which starts with "{".
RESULT_HEADER = struct.Struct("<cQBB3QQd")  # b"R", job id, dtype, ndim, shape (3, 0-filled), n_tokens, compute_ms
_RESULT_TAG = b"R"
RESULT_DTYPES = ("float32", "float16")


def job_header(job_id: int, seconds_left: float | None, is_tokenized: bool, show_tokens: bool,
               is_query: bool = False) -> bytes:
    """`is_query`: the job is a whole small request (service/scheduler.py `Job.is_query`), which the
    worker encodes ahead of bulk jobs (service/lanes.py)."""
    flags = (_IS_TOKENIZED if is_tokenized else 0) | (_SHOW_TOKENS if show_tokens else 0) | (_IS_QUERY if is_query else 0)
    return JOB_HEADER.pack(job_id, math.nan if seconds_left is None else seconds_left, flags)


def read_job_header(frame: bytes) -> tuple[int, float | None, bool, bool, bool]:
    """(job id, seconds left or None, is_tokenized, show_tokens, is_query); ValueError if `frame` is
    not a JOB header."""
    try:
        job_id, left, flags = JOB_HEADER.unpack(frame)
    except struct.error as e:
        raise ValueError(f"not a JOB header ({len(frame)} bytes): {e}") from None
    return (job_id, None if math.isnan(left) else left, bool(flags & _IS_TOKENIZED), bool(flags & _SHOW_TOKENS),
            bool(flags & _IS_QUERY))


def result_header(job_id: int, dtype: str, shape: tuple[int, ...], n_tokens: int, compute_ms: float) -> bytes:
    """A successful RESULT's header (one with `tokens` is `dumps` of the whole dict)."""
    if dtype in RESULT_DTYPES and 1 <= len(shape) <= 3:
        dims = (*shape, 0, 0)[:3]
        return RESULT_HEADER.pack(_RESULT_TAG, job_id, RESULT_DTYPES.index(dtype), len(shape), *dims, n_tokens,
                                  compute_ms)
    return dumps({"job": job_id, "ok": True, "dtype": dtype, "shape": list(shape), "n_tokens": n_tokens,
                  "compute_ms": compute_ms})


def read_result_header(frame: bytes) -> dict:
    """A RESULT header as a dict ({job, ok, ...} as in JSON); {} for anything that is not one, so that
    what a peer on the network sends is ignored rather than raised on."""
    if frame[:1] == b"{":
        return json_object(frame)
    if len(frame) != RESULT_HEADER.size or frame[:1] != _RESULT_TAG:
        return {}
    _, job_id, dtype, ndim, d0, d1, d2, n_tokens, compute_ms = RESULT_HEADER.unpack(frame)
    if dtype >= len(RESULT_DTYPES) or not 1 <= ndim <= 3:
        return {}
    return {"job": job_id, "ok": True, "dtype": RESULT_DTYPES[dtype], "shape": [d0, d1, d2][:ndim],
            "n_tokens": n_tokens, "compute_ms": compute_ms}


def json_object(frame: bytes | memoryview) -> dict:
    """A JSON object from a peer on the network; {} for anything else."""
    try:
        value = json.loads(bytes(frame) if isinstance(frame, memoryview) else frame)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def loads(frame: bytes | memoryview) -> Any:
    return json.loads(bytes(frame).decode("utf-8"))

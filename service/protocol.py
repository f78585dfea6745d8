"""The broker <-> worker protocol, and the timing constants of both sides.

The client <-> server protocol lives in `service/client.py` (the one file clients copy).
Local workers connect a DEALER to the broker's back-end ROUTER over `ipc://` in the broker's 0700
runtime folder, with an identity the broker drew at random and passed to the process it spawned;
the broker takes READY only from such an identity, carrying that process's pid. Every message
starts with a command frame:

    worker -> broker   READY     json {pid, device, encoder: {...}}       model loaded, ready for jobs
                       FAILED    json {message}                           could not load the model; exiting
                       HB                                                  heartbeat
                       RESULT    json {job, ok, dtype, shape, n_tokens, compute_ms, tokens?}  data
                                 json {job, ok: false, error, message}    a job failed
    broker -> worker   JOB       json {job, seconds_left, is_tokenized, show_tokens}  texts (JSON array:
                                 strings and sentence pairs [A, B], or token lists when is_tokenized)
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
from typing import Any

READY, FAILED, HEARTBEAT, RESULT = b"READY", b"FAILED", b"HB", b"RESULT"
JOB, STOP = b"JOB", b"STOP"
HELLO, WELCOME, REFUSED = b"HELLO", b"WELCOME", b"REFUSED"
REMOTE_PROTOCOL = 1

HEARTBEAT_INTERVAL = 1.0   # seconds between heartbeats, both ways
HEARTBEAT_LIVENESS = 5     # silent intervals before the other side is taken for dead
MAX_JOB_ATTEMPTS = 3       # a job on a worker that died this many times is failed, not retried again
WORKER_PREFETCH_JOBS = 4   # jobs a worker holds at once, so it can merge them into one forward pass
RESPAWN_BACKOFF_MAX = 30.0  # seconds; replacements of a worker that keeps dying start ever later
MAX_REMOTE_WORKERS = 1024  # workers of other hosts a head takes; more are refused
MAX_WORKER_CAPACITY = 64   # jobs in hand a worker may ask for in READY; more is cut to this
REJOIN_BACKOFF_MAX = 8.0   # seconds; a worker host that finds no head tries again ever later, up to this


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


# JOB and RESULT headers are on every request's path, and `json.dumps` of a small dict costs 30-50 us
# on a CPU whose caches the forward pass just emptied (~5% of one sentence's latency, counting both):
# their fixed fields are formatted by hand. They are still JSON, read with `loads`.

def job_header(job_id: int, seconds_left: float | None, is_tokenized: bool, show_tokens: bool) -> bytes:
    left = "null" if seconds_left is None else repr(float(seconds_left))
    return (b'{"job": %d, "seconds_left": %s, "is_tokenized": %s, "show_tokens": %s}'
            % (job_id, left.encode(), _JSON_BOOL[is_tokenized], _JSON_BOOL[show_tokens]))


def result_header(job_id: int, dtype: str, shape: tuple[int, ...], n_tokens: int, compute_ms: float) -> bytes:
    """A RESULT's header (without `tokens`: with them, `dumps` the dict)."""
    return (b'{"job": %d, "ok": true, "dtype": %s, "shape": [%s], "n_tokens": %d, "compute_ms": %s}'
            % (job_id, _json_name(dtype), ", ".join(map(str, shape)).encode(), n_tokens, repr(float(compute_ms)).encode()))


def _json_name(name: str) -> bytes:
    return b'"%s"' % name.encode() if name.isalnum() else dumps(name)  # "float32": nothing to escape


_JSON_BOOL = {True: b"true", False: b"false"}


def loads(frame: bytes | memoryview) -> Any:
    return json.loads(bytes(frame).decode("utf-8"))

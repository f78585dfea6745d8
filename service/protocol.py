"""The broker <-> worker protocol, and the timing constants of both sides.

The client <-> server protocol lives in `service/client.py` (the one file clients copy).
Workers connect a DEALER to the broker's back-end ROUTER on loopback; every message starts with
a command frame:

    worker -> broker   READY     json {pid, device, encoder: {...}}       model loaded, ready for jobs
                       FAILED    json {message}                           could not load the model; exiting
                       HB                                                  heartbeat
                       RESULT    json {job, ok, dtype, shape, n_tokens, compute_ms, tokens?}  data
                                 json {job, ok: false, error, message}    a job failed
    broker -> worker   JOB       json {job, deadline, is_tokenized, show_tokens}  texts (JSON array:
                                 strings and sentence pairs [A, B], or token lists when is_tokenized)
                       HB                                                  heartbeat
                       STOP                                                finish and exit
"""
from __future__ import annotations

import json
from typing import Any

READY, FAILED, HEARTBEAT, RESULT = b"READY", b"FAILED", b"HB", b"RESULT"
JOB, STOP = b"JOB", b"STOP"

HEARTBEAT_INTERVAL = 1.0   # seconds between heartbeats, both ways
HEARTBEAT_LIVENESS = 5     # silent intervals before the other side is taken for dead
MAX_JOB_ATTEMPTS = 3       # a job on a worker that died this many times is failed, not retried again
WORKER_PREFETCH_JOBS = 4   # jobs a worker holds at once, so it can merge them into one forward pass
RESPAWN_BACKOFF_MAX = 30.0  # seconds; replacements of a worker that keeps dying start ever later


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


def loads(frame: bytes | memoryview) -> Any:
    return json.loads(bytes(frame).decode("utf-8"))

"""Request latency histograms kept by the broker, and the Prometheus text the HTTP door serves.

The broker observes each request it answers with vectors (`RequestMetrics.observe`, in its
`complete()`); the snapshot is part of `server_status()`, and `/metrics` renders that status, so
Prometheus sees exactly the numbers `BertClient().server_status()` gives: one source of truth.

Names follow Hugging Face TEI's where one means the same thing (`te_request_duration`, ...), so
its dashboards work; the rest are `bert_serving_*`. Every metric is listed in the README.
"""
from __future__ import annotations

import bisect
import time
from typing import Any, Iterable

# Seconds: 1 ms to a minute, about x2.5 apart (a one-sentence request on a GPU to a large CPU batch).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """Counts of observations at or below each bound (Prometheus' `le`), their sum and count."""

    def __init__(self, bounds: Iterable[float] = DURATION_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket, the last one above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> dict[str, Any]:
        """Plain JSON: bounds, cumulative counts per bound (then +Inf), sum."""
        cumulative, total = [], 0
        for count in self.counts:
            total += count
            cumulative.append(total)
        return {"le": list(self.bounds), "counts": cumulative, "sum": self.sum}


class RequestMetrics:
    """What the broker measures per answered request, beyond its counters in `stats`.

    - queue: from arrival to its first job leaving for a worker (time in the broker's queue);
    - inference: the model's compute time spent on its sentences (the workers' `compute_ms`,
      each job's share of its forward passes by tokens);
    - total: from arrival to the reply leaving the broker.
    The rest of `total` is waiting at the worker (a worker holds several jobs), tokenizing, and
    the moves between processes.
    """

    def __init__(self) -> None:
        self.queue, self.inference, self.total = Histogram(), Histogram(), Histogram()
        self.tokens = 0

    def observe(self, received: float, dispatched: float | None, compute_ms: float, n_tokens: int) -> None:
        """One request answered now; `received` and `dispatched` are `time.monotonic()` values."""
        now = time.monotonic()
        self.queue.observe((dispatched or now) - received)
        self.inference.observe(compute_ms / 1000)
        self.total.observe(now - received)
        self.tokens += n_tokens

    def snapshot(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "queue_seconds": self.queue.snapshot(),
                "inference_seconds": self.inference.snapshot(), "total_seconds": self.total.snapshot()}


# ---------------------------------------------------------------- Prometheus text format


#: The broker's own counters in `server_status()`, exported under their own names.
BROKER_COUNTERS = (
    ("busy", "Requests refused at once because the queue was full"),
    ("timeouts_dropped", "Requests dropped because their client's timeout passed while queued"),
    ("replies_dropped_unread",
     "Replies dropped because their client left -max_unread_replies unread and its outbox was full"),
    ("disconnected_dropped", "Queued requests dropped because their client disconnected"),
    ("cancelled_dropped", "Queued requests dropped because their client cancelled them (an HTTP client that "
                          "disconnected, BertClient.encode_async left early)"),
    ("connections_refused", "Connections refused by CurveZMQ authentication (-auth_dir)"),
    ("peers_turned_away", "Connections at the client port that spoke another protocol (the 2019 client, HTTP)"),
)


def prometheus_text(status: dict, http_responses: dict[tuple[str, int], int] | None = None,
                    info: dict | None = None) -> str:
    """The Prometheus exposition (text format 0.0.4) of a `server_status()` dict, plus the HTTP
    door's own response counts by (route, status code) and the model's description."""
    out = _Writer()
    stats = status.get("metrics", {})
    failures = {"validation": status.get("bad_requests", 0), "overloaded": status.get("busy", 0),
                "backend": status.get("errors", 0)}
    out.metric("te_request_count", "counter", "Encode requests that reached the broker, answered or not",
               [({}, status.get("requests", 0) + sum(failures.values()))])
    out.metric("te_request_success", "counter", "Requests answered with vectors",
               [({}, status.get("requests", 0))])
    out.metric("te_request_failure", "counter",
               "Requests refused or failed: validation = bad request, overloaded = queue full (busy), "
               "backend = failed while queued or encoding (timeouts included)",
               [({"err": err}, n) for err, n in failures.items()])
    out.metric("te_queue_size", "gauge", "Sentences waiting for a worker", [({}, status.get("queued_sentences", 0))])
    for name, key, text in (
            ("te_request_duration", "total_seconds", "Seconds from a request's arrival to its reply"),
            ("te_request_queue_duration", "queue_seconds", "Seconds a request waited in the broker's queue"),
            ("te_request_inference_duration", "inference_seconds",
             "Seconds of model compute spent on a request's sentences")):
        if key in stats:
            out.histogram(name, text, stats[key])
    out.metric("bert_serving_sentences_total", "counter", "Sentences encoded", [({}, status.get("sentences", 0))])
    out.metric("bert_serving_tokens_total", "counter", "Tokens the model saw ([CLS] and [SEP] included)",
               [({}, stats.get("tokens", 0))])
    for key, text in BROKER_COUNTERS:  # server_status()[key] as bert_serving_<key>_total
        out.metric(f"bert_serving_{key}_total", "counter", text, [({}, status.get(key, 0))])
    out.metric("bert_serving_loop_max_seconds", "gauge",
               "The longest the broker's loop went without polling its sockets, since start",
               [({}, status.get("loop_max_ms", 0.0) / 1000)])
    out.metric("bert_serving_queued_jobs", "gauge", "Mini-batches waiting for a worker",
               [({}, status.get("queued_jobs", 0))])
    workers = status.get("workers", [])
    out.metric("bert_serving_workers", "gauge", "Worker processes configured", [({}, len(workers))])
    out.metric("bert_serving_workers_ready", "gauge", "Workers that have loaded the model and take jobs",
               [({}, status.get("workers_ready", 0))])
    out.metric("bert_serving_worker_restarts_total", "counter", "Workers replaced after exiting or falling silent",
               [({}, status.get("worker_restarts", 0))])
    out.metric("bert_serving_worker_jobs_in_flight", "gauge", "Jobs a worker holds now",
               [({"worker": str(w.get("index"))}, w.get("jobs_in_flight", 0)) for w in workers])
    out.metric("bert_serving_worker_sentences_total", "counter", "Sentences a worker slot has encoded",
               [({"worker": str(w.get("index"))}, w.get("sentences_done", 0)) for w in workers])
    out.metric("bert_serving_door_restarts_total", "counter", "Front-end processes (doors) restarted",
               [({"door": str(d.get("name"))}, d.get("restarts", 0)) for d in status.get("doors", [])])
    out.metric("bert_serving_uptime_seconds", "gauge", "Seconds since the server started",
               [({}, status.get("uptime", 0.0))])
    if http_responses is not None:
        out.metric("bert_serving_http_responses_total", "counter",
                   "HTTP responses of this door by route and status code (since the door started)",
                   [({"route": route, "code": str(code)}, n) for (route, code), n in sorted(http_responses.items())])
    if info:
        labels = {k: str(info[k]) for k in ("model", "dim", "max_seq_len", "pooling", "dtype", "device") if k in info}
        out.metric("bert_serving_model_info", "gauge", "The model served (always 1; its labels describe it)",
                   [(labels, 1)])
    return out.text()


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, text: str, samples: list[tuple[dict, float]]) -> None:
        self.lines += [f"# HELP {name} {_escape_help(text)}", f"# TYPE {name} {kind}"]
        self.lines += [f"{name}{_labels(labels)} {_number(value)}" for labels, value in samples]

    def histogram(self, name: str, text: str, snapshot: dict) -> None:
        self.lines += [f"# HELP {name} {_escape_help(text)}", f"# TYPE {name} histogram"]
        bounds = [*(_number(b) for b in snapshot["le"]), "+Inf"]
        self.lines += [f'{name}_bucket{{le="{le}"}} {count}' for le, count in zip(bounds, snapshot["counts"])]
        self.lines += [f"{name}_sum {_number(snapshot['sum'])}", f"{name}_count {snapshot['counts'][-1]}"]

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items()) + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(int(value))

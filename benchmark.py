"""Benchmark bert-as-service end to end: sentences per second through `BertClient` against a real `app.py`.

    python benchmark.py                                  # quick run: bundled all-MiniLM-L6-v2, GPU if any
    python benchmark.py -max_seq_len 25 128 -client_batch_size 1 16 256 1024 -num_client 1 4 16 \\
                        -num_worker 1 2 -num_sentences 2000 -repeat 3
    python benchmark.py -compare                         # also sentence-transformers, same model and sentences
    python benchmark.py -random_bert_base bench_out/bert_base -compare    # random BERT-base, no download
    python benchmark.py -preset cpu_bar                  # the issue's CPU bar, PASS/FAIL
    python benchmark.py -preset gpu_bar                  # the issue's GPU bar (H100, fp16)
    python benchmark.py -preset http_bar                 # HTTP door vs BertClient, 2-core CPU
    python benchmark.py -protocol zmq http               # both front doors, side by side
    python benchmark.py -preset latency_bar              # one sentence: server vs bare ONNX Runtime, PASS/FAIL
    python benchmark.py -cpu -latency_compare            # the same comparison, without the bars

What one point is: the server runs with one (max_seq_len, num_worker, dtype); `num_client` threads,
each with its own `BertClient`, start together at a barrier and send their share of the
`num_sentences` sentences in requests of `client_batch_size` (one request at a time per client,
as in the 2018 benchmark, unless -max_in_flight is raised); throughput is all sentences over the
wall time from the barrier to the last reply. Each point is measured -repeat times after a
warm-up, and the median is reported. The server is restarted only when a server-side setting
changes. "Latency" is -latency_requests single-sentence requests one after another (median, p99).

With -compare, sentence-transformers encodes the same sentences with the same model in this
process, while the server is up but idle; its repeats are interleaved with the service's, so load
from other processes hits both alike, and the ratio service / sentence-transformers is printed
per max_seq_len (against the fastest of the -st_batch_size values tried).

Everything goes to -out (default bench_out/, git-ignored): results.csv, and one chart per swept
parameter (speed_vs_max_seq_len.png, ..._client_batch_size, ..._num_client, ..._num_worker), as
in the 2018 README. Exit status: 0, or 1 when a preset's bar fails.

With -protocol zmq http, every point is also measured through the server's HTTP door with the
official `openai` client (its default: base64 on the wire), one `OpenAI` client per client thread;
rows of kind "service/http" and "latency/http" sit beside BertClient's, and "http / zmq" lines
compare each pair. -protocol http_plain sends the same requests through the standard library's
http.client instead: the door's own cost, without the openai client's.

With -latency_compare, the run is one single-sentence latency table instead: the server through
BertClient, our `Encoder` in this process (each -cpu_engine), bare ONNX Runtime (the Hugging Face model
exported with eager attention and fused by ONNX Runtime's transformer optimizer, tokenized by
`tokenizers`, mean-pooled in numpy: what a user would write by hand), the same bare ONNX Runtime in a
process of its own that the client calls directly (the floor under any server's latency), and
sentence-transformers. They take turns in blocks of 20 sentences, in an order drawn afresh every
round, so load from elsewhere falls on all alike; p50/p90/p99 of each, and the p50 ratios' 95% intervals.
It is meant for the bundled model (the bare path pools as it does: mean, normalised).
-baseline_checkout DIR adds the server of another checkout (`git worktree add /tmp/base HEAD~3`) to
the turns: a before/after in one run, which on a noisy machine is sharper than two runs. It starts
second; two servers of one commit measured 0.990x and 0.997x (second against first) on 2 vCPUs, so
differences under ~1% are noise.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bert.config import effective_dtype
from bert.random_model import build_random_bert
from service.checks import cpuinfo
from service.client import BertClient
from service.corpus import DEFAULT_CORPUS, corpus_sentences
from service.harness import ROOT, RunningServer, cpu_ticks, free_port, group_pids

DEFAULT_OUT = ROOT / "bench_out"
CLIENT_TIMEOUT = 900.0  # seconds; one large request to a slow CPU server can take minutes
SERVER_READY_TIMEOUT = 600.0
QUIET_SHARE = 0.10  # other processes using less than this share of the CPU count as "quiet"

# The acceptance bars. Each preset fixes the whole run, so its numbers mean the same thing
# on every machine; explicit flags still override them (at the user's own risk).
PRESETS: dict[str, dict[str, Any]] = {
    # 2-core CPU, the bundled MiniLM, the first 2,000 shared sentences, max_seq_len 128: the whole
    # corpus in one encode() call on each side, the server with its default single worker, against
    # sentence-transformers' default batch size and a larger one (the faster counts). The machine
    # is shared: each measurement first waits (up to 20 s) for other processes to leave the CPU,
    # and one they disturbed anyway is taken again (twice at most).
    "cpu_bar": dict(device="cpu", model_dir=None, random_bert_base=None, num_sentences=2000,
                    max_seq_len=[128], client_batch_size=[2000], num_client=[1], num_worker=[1],
                    dtype=["auto"], repeat=3, compare=True, st_batch_size=[32, 128], latency_requests=100,
                    wait_quiet=20, retry_noisy=2),
    # One sentence at a time on the 2-core CPU: the server (its default engine) against bare ONNX
    # Runtime, our encoder in-process and sentence-transformers, taking turns, 300 sentences each.
    "latency_bar": dict(device="cpu", model_dir=None, random_bert_base=None, max_seq_len=[128],
                        num_worker=[1], dtype=["auto"], latency_compare=True, latency_requests=300),
    # H100, random BERT-base in fp16, 20,000 sentences, max_seq_len 25 and 128.
    # The HTTP door against BertClient on the 2-core CPU: 256-sentence requests, one client, the
    # bundled MiniLM; throughput and single-sentence latency through each door, interleaved.
    "http_bar": dict(device="cpu", model_dir=None, random_bert_base=None, num_sentences=2048,
                     max_seq_len=[128], client_batch_size=[256], num_client=[1], num_worker=[1],
                     dtype=["auto"], repeat=3, compare=False, latency_requests=300,
                     protocol=["zmq", "http", "http_plain"],
                     wait_quiet=20, retry_noisy=2),
    "gpu_bar": dict(device="cuda", model_dir=None, random_bert_base=str(DEFAULT_OUT / "random_bert_base"),
                    num_sentences=20000, max_seq_len=[25, 128], client_batch_size=[1024, 4096],
                    num_client=[1, 4], num_worker=[1], dtype=["fp16"], repeat=3, compare=True,
                    st_batch_size=[32, 256], latency_requests=1000, wait_quiet=0, retry_noisy=0),
}


# ---------------------------------------------------------------- hardware and input


def describe_hardware(device: str) -> str:
    """'Intel Xeon ... (2 cores)', plus the GPU's name when the run uses one."""
    import platform

    cpu = cpuinfo("model name") or platform.processor() or "unknown CPU"
    text = f"{cpu} ({os.cpu_count()} cores)"
    if device.startswith("cuda"):
        import torch
        text = f"{torch.cuda.get_device_name(torch.device(device))} GPU, {text}"
    return text


def cpu_load_warning() -> str | None:
    """Other processes on the CPU make every number here noisy; say so beside the numbers."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load > 0.5 * cores:
        return f"warning: load average {load:.1f} on {cores} cores before the run: other processes compete for the CPU"
    return None


# ---------------------------------------------------------------- other processes on the machine


def _machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine since boot, all cores, from /proc/stat.
    Steal (the hypervisor running other guests) counts as busy: it is time we did not get."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


class CpuMeter:
    """Share of the machine's CPU used by processes other than this benchmark and its server.

    On a shared machine a burst of someone else's work can halve one measurement and not the
    next; this number, printed beside each measurement, tells a real difference from such noise.
    """

    def __init__(self, own_pids: Callable[[], list[int]]) -> None:
        self.own_pids = own_pids
        self.available = Path("/proc/stat").is_file()
        self._start: tuple[int, int, int] | None = None

    def start(self) -> None:
        if self.available:
            self._start = (*_machine_jiffies(), cpu_ticks(self.own_pids()))

    def stop(self) -> float | None:
        """The share (0..1 of all cores) others used since `start()`, or None where unknown."""
        if not self.available or self._start is None:
            return None
        busy, total = _machine_jiffies()
        ours = cpu_ticks(self.own_pids())
        busy0, total0, ours0 = self._start
        if total <= total0:
            return None
        return min(1.0, max(0.0, ((busy - busy0) - (ours - ours0)) / (total - total0)))

    def wait_until_quiet(self, max_wait: float, threshold: float, window: float = 1.0) -> float | None:
        """Wait (up to `max_wait` s) for a `window` in which others use under `threshold` of the CPU;
        return the last share seen."""
        deadline = time.monotonic() + max_wait
        while True:
            self.start()
            time.sleep(window)
            share = self.stop()
            if share is None or share < threshold or time.monotonic() >= deadline:
                return share


# ---------------------------------------------------------------- measurements


@dataclass
class Row:
    """One measured point: a throughput (sentences/s per repeat) or a latency (ms per request)."""

    kind: str                      # 'service', 'sentence-transformers', 'latency' ('.../http' through HTTP)
    max_seq_len: int
    dtype: str
    num_worker: int | None = None
    client_batch_size: int | None = None   # for sentence-transformers: its encode(batch_size=...)
    num_client: int | None = None
    sentences: int = 0
    runs: list[float] = field(default_factory=list)
    other_cpu: list[float] = field(default_factory=list)  # per run: CPU share other processes used

    @property
    def median(self) -> float:
        return statistics.median(self.runs) if self.runs else float("nan")

    @property
    def p99(self) -> float:
        return float(np.percentile(self.runs, 99)) if self.runs else float("nan")


def split_evenly(items: Sequence[str], parts: int) -> list[list[str]]:
    """`parts` contiguous shares whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    shares, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        shares.append(list(items[start:end]))
        start = end
    return shares


# Row kinds of each front door: (throughput, latency). http_plain is the HTTP door through the
# standard library's http.client: the door's own cost, without the openai client's.
PROTOCOL_KINDS = {"zmq": ("service", "latency"), "http": ("service/http", "latency/http"),
                  "http_plain": ("service/http_plain", "latency/http_plain")}


@dataclass(frozen=True)
class Door:
    """Where a benchmark client connects: BertClient's port (zmq), or the HTTP door's (http)."""

    protocol: str
    port: int

    def client(self) -> Any:
        if self.protocol == "http":
            return OpenAIClient(self.port)
        if self.protocol == "http_plain":
            return PlainHttpClient(self.port)
        return BertClient(port=self.port, timeout=CLIENT_TIMEOUT)


class OpenAIClient:
    """The official `openai` client against the HTTP door, shaped like BertClient for the benchmark:
    base64 on the wire (the SDK's default since 1.62); the vectors as the SDK gives them (lists)."""

    def __init__(self, port: int) -> None:
        from openai import OpenAI

        self.client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="benchmark", timeout=CLIENT_TIMEOUT,
                             max_retries=0)

    def encode(self, texts: Sequence[str]) -> list[list[float]]:
        return [item.embedding for item in self.client.embeddings.create(model="benchmark", input=list(texts)).data]

    def encode_async(self, batches: Sequence[Sequence[str]], max_in_flight: int = 4):
        """Up to `max_in_flight` requests out at once (threads sharing the client), results in order."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_in_flight) as pool:
            yield from pool.map(self.encode, batches)

    def __enter__(self) -> "OpenAIClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.client.close()


class PlainHttpClient(OpenAIClient):
    """The same requests and base64 answers through the standard library's http.client (one
    keep-alive connection): what the HTTP door costs, without the openai client's own work."""

    def __init__(self, port: int) -> None:
        import http.client

        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import base64

        body = json.dumps({"input": list(texts), "model": "benchmark", "encoding_format": "base64"})
        self.connection.request("POST", "/v1/embeddings", body=body, headers={"Content-Type": "application/json"})
        response = self.connection.getresponse()
        reply = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {reply}")
        return np.stack([np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in reply["data"]])

    def encode_async(self, batches: Sequence[Sequence[str]], max_in_flight: int = 4):
        for batch in batches:  # one connection: one request at a time
            yield self.encode(batch)

    def __exit__(self, *exc: Any) -> None:
        self.connection.close()


def client_throughput(door: Door, sentences: Sequence[str], batch_size: int, num_client: int,
                      max_in_flight: int = 1) -> float:
    """Sentences per second of `num_client` concurrent clients, each sending its share of
    `sentences` in requests of `batch_size`; timed from a common start to the last reply."""
    shares = [s for s in split_evenly(sentences, num_client) if s]
    barrier = threading.Barrier(len(shares) + 1)
    errors: list[BaseException] = []

    def run(share: list[str]) -> None:
        try:
            with door.client() as bc:
                bc.encode(share[:1])  # connection set up before the clock starts
                barrier.wait()
                batches = [share[i:i + batch_size] for i in range(0, len(share), batch_size)]
                if max_in_flight > 1:
                    for _ in bc.encode_async(batches, max_in_flight=max_in_flight):
                        pass
                else:
                    for batch in batches:
                        bc.encode(batch)
        except BaseException as e:  # re-raised in the main thread; abort so nobody waits forever
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(share,), daemon=True) for share in shares]
    for t in threads:
        t.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return len(sentences) / elapsed


def single_sentence_latencies(door: Door, sentences: Sequence[str], n: int, warmup: int = 10) -> list[float]:
    """Milliseconds for each of `n` one-sentence requests sent one after another."""
    times = []
    with door.client() as bc:
        for i in range(warmup + n):
            text = [sentences[i % len(sentences)]]
            start = time.perf_counter()
            bc.encode(text)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    return times


def service_vectors(port: int, sentences: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """Vectors for `sentences` (also the server's warm-up: every worker sees real batches)."""
    with BertClient(port=port, timeout=CLIENT_TIMEOUT) as bc:
        batches = [list(sentences[i:i + batch_size]) for i in range(0, len(sentences), batch_size)]
        return np.concatenate(list(bc.encode_async(batches, max_in_flight=4)))


class SentenceTransformersRunner:
    """sentence-transformers on the same folder, device and precision as the server."""

    def __init__(self, model_dir: str, device: str, dtype: str) -> None:
        import torch
        import transformers
        from sentence_transformers import SentenceTransformer

        transformers.utils.logging.disable_progress_bar()  # its per-weight bar would break up the table
        self.model = SentenceTransformer(model_dir, device=device)
        precision = effective_dtype(dtype, device)
        if precision == "fp16":
            self.model.half()
        elif precision == "bf16":
            self.model.to(torch.bfloat16)
        self.device = device

    def encode(self, sentences: Sequence[str], max_seq_len: int, batch_size: int) -> np.ndarray:
        self.model.max_seq_length = max_seq_len
        return self.model.encode(list(sentences), batch_size=batch_size, convert_to_numpy=True,
                                 show_progress_bar=False).astype(np.float32)

    def throughput(self, sentences: Sequence[str], max_seq_len: int, batch_size: int) -> float:
        start = time.perf_counter()
        self.encode(sentences, max_seq_len, batch_size)  # returns numpy: the GPU work is finished
        return len(sentences) / (time.perf_counter() - start)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return float(np.mean(np.sum(a * b, axis=1)))


# ---------------------------------------------------------------- output


TABLE_COLUMNS = ("kind", "max_seq_len", "dtype", "workers", "batch", "clients", "median", "min..max / p99")


def table_header(hardware: str, model: str, corpus: str, notes: Sequence[str]) -> str:
    lines = [f"hardware: {hardware}", f"model:    {model}", f"corpus:   {corpus}", *notes, "",
             f"{'kind':<22}{'max_seq_len':>12}{'dtype':>7}{'workers':>9}{'batch':>7}{'clients':>9}"
             f"{'median':>14}   min..max (or p99)",
             "-" * 100]
    return "\n".join(lines)


def table_line(row: Row) -> str:
    def cell(value: Any) -> str:
        return "-" if value is None else str(value)

    if row.kind.startswith("latency"):
        value, spread = f"{row.median:,.2f} ms", f"p99 {row.p99:,.2f} ms"
    else:
        value, spread = f"{row.median:,.0f} sent/s", f"{min(row.runs):,.0f}..{max(row.runs):,.0f}"
    others = f"   (others used up to {max(row.other_cpu):.0%} CPU)" if row.other_cpu else ""
    return (f"{row.kind:<22}{row.max_seq_len:>12}{row.dtype:>7}{cell(row.num_worker):>9}"
            f"{cell(row.client_batch_size):>7}{cell(row.num_client):>9}{value:>14}   {spread}{others}")


CSV_FIELDS = ("hardware", "device", "model", "kind", "dtype", "max_seq_len", "num_worker", "client_batch_size",
              "num_client", "max_in_flight", "sentences", "repeat", "sent_per_s", "sent_per_s_min",
              "sent_per_s_max", "latency_median_ms", "latency_p99_ms", "runs", "other_cpu_max")


def write_csv(path: Path, rows: Sequence[Row], context: dict[str, Any]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            record = {**context, "kind": row.kind, "dtype": row.dtype, "max_seq_len": row.max_seq_len,
                      "num_worker": row.num_worker, "client_batch_size": row.client_batch_size,
                      "num_client": row.num_client, "sentences": row.sentences,
                      "repeat": None if row.kind.startswith("latency") else len(row.runs),
                      "runs": " ".join(f"{r:.4g}" for r in row.runs),
                      "other_cpu_max": f"{max(row.other_cpu):.3f}" if row.other_cpu else None}
            if row.kind.startswith("latency"):
                record.update(latency_median_ms=f"{row.median:.3f}", latency_p99_ms=f"{row.p99:.3f}")
            else:
                record.update(sent_per_s=f"{row.median:.1f}", sent_per_s_min=f"{min(row.runs):.1f}",
                              sent_per_s_max=f"{max(row.runs):.1f}")
            if not row.kind.startswith("service"):
                record["max_in_flight"] = None
            writer.writerow(record)


# The seed's charts: speed against one parameter, a line per value of another, the rest held fixed.
CHARTS = (("max_seq_len", "client_batch_size"), ("client_batch_size", "max_seq_len"),
          ("num_client", "max_seq_len"), ("num_worker", "max_seq_len"))


def reference_values(sweeps: dict[str, list]) -> dict[str, Any]:
    """What a chart holds fixed: the largest client batch (small ones measure round trips, not the
    model), the first value of everything else."""
    ref = {name: values[0] for name, values in sweeps.items()}
    ref["client_batch_size"] = max(sweeps["client_batch_size"])
    return ref


def plot_charts(rows: Sequence[Row], sweeps: dict[str, list], out: Path, title: str) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    service = [r for r in rows if r.kind == "service"]
    st_best = best_by_seq_len([r for r in rows if r.kind == "sentence-transformers"])
    ref = reference_values(sweeps)
    paths = []
    for x_name, line_name in CHARTS:
        fixed = {k: v for k, v in ref.items() if k not in (x_name, line_name)}
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        for line_value in sweeps[line_name]:
            points = sorted((getattr(r, x_name), r.median) for r in service
                            if getattr(r, line_name) == line_value
                            and all(getattr(r, k) == v for k, v in fixed.items()))
            if points:
                ax.plot(*zip(*points), marker="o", label=f"{line_name}={line_value}")
        if x_name == "max_seq_len" and st_best:
            points = sorted((length, r.median) for length, r in st_best.items())
            ax.plot(*zip(*points), marker="s", linestyle="--", color="gray", label="sentence-transformers")
        if x_name in ("client_batch_size", "num_client") and len(sweeps[x_name]) > 1 \
                and max(sweeps[x_name]) / min(sweeps[x_name]) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(sweeps[x_name])
        ax.set_xticklabels([str(v) for v in sweeps[x_name]])
        ax.set_xlabel(x_name)
        ax.set_ylabel("sentences / s")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        held = ", ".join(f"{k}={v}" for k, v in fixed.items())
        ax.set_title(f"{title}\nspeed vs {x_name} ({held})", fontsize=8)
        fig.tight_layout()
        path = out / f"speed_vs_{x_name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- bars


@dataclass
class BarCheck:
    name: str
    passed: bool
    detail: str


def best_by_seq_len(rows: Sequence[Row]) -> dict[int, Row]:
    """The fastest row (by median) at each max_seq_len."""
    best: dict[int, Row] = {}
    for row in rows:
        if row.max_seq_len not in best or row.median > best[row.max_seq_len].median:
            best[row.max_seq_len] = row
    return best


def describe_point(row: Row) -> str:
    if row.kind == "sentence-transformers":
        return f"batch_size={row.client_batch_size}"
    return f"num_worker={row.num_worker}, client_batch_size={row.client_batch_size}, num_client={row.num_client}"


def ratio_checks(rows: Sequence[Row], at_least: float, never_below: float | None) -> list[BarCheck]:
    """Service / sentence-transformers at each max_seq_len: best service point against best
    sentence-transformers batch size on medians, and (interleaved) repeat by repeat."""
    service = best_by_seq_len([r for r in rows if r.kind == "service"])
    st = best_by_seq_len([r for r in rows if r.kind == "sentence-transformers"])
    checks = []
    for length in sorted(service):
        if length not in st:
            checks.append(BarCheck(f"max_seq_len {length}: service >= {at_least:g}x sentence-transformers",
                                   False, "sentence-transformers was not measured"))
            continue
        s, t = service[length], st[length]
        ratio = s.median / t.median
        checks.append(BarCheck(
            f"max_seq_len {length}: service >= {at_least:g}x sentence-transformers", ratio >= at_least,
            f"{s.median:,.0f} vs {t.median:,.0f} sent/s = {ratio:.2f}x "
            f"(service {describe_point(s)}; sentence-transformers {describe_point(t)})"))
        if never_below is not None:
            paired = [a / b for a, b in zip(s.runs, t.runs)]
            others = [max(pair) for pair in zip(s.other_cpu, t.other_cpu)]
            notes = [f" (others used up to {o:.0%} CPU)" for o in others] or [""] * len(paired)
            checks.append(BarCheck(
                f"max_seq_len {length}: no repeat below {never_below:g}x", min(paired) >= never_below,
                "repeat ratios " + ", ".join(f"{p:.2f}x{n}" for p, n in zip(paired, notes))))
    return checks


def throughput_checks(rows: Sequence[Row], minimum: dict[int, float]) -> list[BarCheck]:
    service = best_by_seq_len([r for r in rows if r.kind == "service"])
    checks = []
    for length, floor in minimum.items():
        row = service.get(length)
        checks.append(BarCheck(
            f"max_seq_len {length}: >= {floor:,.0f} sentences/s", row is not None and row.median >= floor,
            "not measured" if row is None else f"{row.median:,.0f} sent/s ({describe_point(row)})"))
    return checks


def latency_checks(rows: Sequence[Row], max_ms: float) -> list[BarCheck]:
    return [BarCheck(f"max_seq_len {r.max_seq_len}, num_worker {r.num_worker}: single-sentence median "
                     f"latency < {max_ms:g} ms", r.median < max_ms,
                     f"median {r.median:.2f} ms, p99 {r.p99:.2f} ms")
            for r in rows if r.kind == "latency"]


def http_pairs(rows: Sequence[Row], kinds: tuple[str, str]) -> list[tuple[Row, Row]]:
    """(BertClient row, HTTP row) for every point measured through both doors."""
    def key(r: Row) -> tuple:
        return r.max_seq_len, r.dtype, r.num_worker, r.client_batch_size, r.num_client

    zmq = {key(r): r for r in rows if r.kind == kinds[0]}
    return [(zmq[key(r)], r) for r in rows if r.kind == kinds[1] and key(r) in zmq]


def http_checks(rows: Sequence[Row], min_ratio: float, max_extra_ms: float) -> list[BarCheck]:
    """HTTP throughput against BertClient's (medians), and single-sentence median latency above it."""
    checks = [BarCheck(f"max_seq_len {h.max_seq_len}, {describe_point(h)}: HTTP throughput >= {min_ratio:g}x "
                       "BertClient's", h.median / z.median >= min_ratio,
                       f"{h.median:,.0f} vs {z.median:,.0f} sent/s = {h.median / z.median:.2f}x")
              for z, h in http_pairs(rows, ("service", "service/http"))]
    checks += [BarCheck(f"max_seq_len {h.max_seq_len}, single sentence: HTTP median latency <= BertClient's "
                        f"+ {max_extra_ms:g} ms", h.median - z.median <= max_extra_ms,
                        f"{h.median:.2f} vs {z.median:.2f} ms = {h.median - z.median:+.2f} ms "
                        f"(p99 {h.p99:.2f} vs {z.p99:.2f} ms)")
               for z, h in http_pairs(rows, ("latency", "latency/http"))]
    return checks or [BarCheck("HTTP measured beside BertClient", False, "no point was measured through both")]


def http_lines(rows: Sequence[Row]) -> list[str]:
    lines = [f"{c.name.split(': HTTP')[0]}: {c.detail}" for c in http_checks(rows, 0.0, float("inf"))]
    lines += [f"max_seq_len {h.max_seq_len}, single sentence, plain http.client: {h.median:.2f} vs {z.median:.2f} ms "
              f"= {h.median - z.median:+.2f} ms" for z, h in http_pairs(rows, ("latency", "latency/http_plain"))]
    return lines


BARS: dict[str, Callable[[Sequence[Row]], list[BarCheck]]] = {
    "cpu_bar": lambda rows: ratio_checks(rows, at_least=1.0, never_below=0.9),
    "http_bar": lambda rows: http_checks(rows, min_ratio=0.9, max_extra_ms=2.0),
    "latency_bar": lambda rows: latency_ratio_checks(rows, max_p50=1.2, max_p99=1.5),
    "gpu_bar": lambda rows: (throughput_checks(rows, {128: 50_000, 25: 60_000})
                             + ratio_checks(rows, at_least=7.0, never_below=None)
                             + latency_checks(rows, max_ms=3.0)),
}


# ---------------------------------------------------------------- the run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmark.py", description="Sentences per second of bert-as-service, end to end through BertClient (and its HTTP door).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-preset", choices=sorted(PRESETS), default=None,
                   help="run exactly the issue's acceptance setting and print PASS/FAIL for its bars")
    model = p.add_argument_group("model")
    model.add_argument("-model_dir", default=None, help="model folder; None: the bundled all-MiniLM-L6-v2")
    model.add_argument("-random_bert_base", metavar="DIR", default=None,
                       help="build (once) a random-weight BERT-base in DIR and benchmark it; no download")
    model.add_argument("-pooling_layer", type=int, default=-1,
                       help="layer the server pools; -1 runs the whole model, as sentence-transformers does")
    sweep = p.add_argument_group("sweeps (several values each)")
    sweep.add_argument("-max_seq_len", type=int, nargs="+", default=[25, 128], help="server side")
    sweep.add_argument("-num_worker", type=int, nargs="+", default=[1], help="server side")
    sweep.add_argument("-dtype", nargs="+", default=["auto"], choices=("auto", "fp32", "fp16", "bf16"),
                       help="server side; auto is fp16 on a GPU, fp32 on the CPU")
    sweep.add_argument("-client_batch_size", type=int, nargs="+", default=[1, 16, 256],
                       help="sentences per request")
    sweep.add_argument("-num_client", type=int, nargs="+", default=[1, 4], help="concurrent clients")
    run = p.add_argument_group("run")
    run.add_argument("-num_sentences", type=int, default=512, help="sentences per measurement (all clients together)")
    run.add_argument("-repeat", type=int, default=3, help="timed repeats per point; the median is reported")
    run.add_argument("-warmup", type=int, default=512, help="sentences encoded before timing (per server, and for sentence-transformers)")
    run.add_argument("-protocol", nargs="+", choices=tuple(PROTOCOL_KINDS), default=["zmq"],
                     help="front doors to measure: zmq (BertClient), http (the official openai client against "
                          "-http_port, base64), http_plain (the same through the standard library's http.client)")
    run.add_argument("-max_in_flight", type=int, default=1,
                     help="requests each client keeps outstanding (1: wait for each reply, as in 2018)")
    run.add_argument("-latency_requests", type=int, default=100, help="single-sentence requests for the latency figure (0: skip)")
    run.add_argument("-wait_quiet", type=float, default=0, metavar="SECONDS",
                     help="before each measurement, wait up to SECONDS for other processes to leave the CPU "
                          "(under 10%% of it for a second); for shared machines")
    run.add_argument("-retry_noisy", type=int, default=0, metavar="N",
                     help="measure again, up to N times, when other processes took over 10%% of the CPU "
                          "meanwhile; the quietest attempt is kept")
    run.add_argument("-corpus", type=Path, default=DEFAULT_CORPUS, help="one sentence a line")
    run.add_argument("-out", type=Path, default=DEFAULT_OUT, help="folder for results.csv and the charts")
    device = p.add_argument_group("device")
    device.add_argument("-device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the GPU if torch sees one, else the CPU")
    device.add_argument("-cpu", dest="device", action="store_const", const="cpu", help="same as -device cpu")
    device.add_argument("-max_batch_size", type=int, default=None, help="passed to the server (its default if unset)")
    device.add_argument("-max_batch_tokens", type=int, default=None, help="passed to the server (its default if unset)")
    device.add_argument("-cpu_threads", type=int, default=None, help="passed to the server (its default if unset)")
    device.add_argument("-output_dtype", choices=("float32", "float16"), default=None, help="passed to the server")
    device.add_argument("-cpu_engine", choices=("onnx", "torch"), default=None, help="passed to the server (its default if unset)")
    compare = p.add_argument_group("comparison")
    compare.add_argument("-compare", action="store_true",
                         help="also time sentence-transformers encode() on the same model and sentences")
    compare.add_argument("-st_batch_size", type=int, nargs="+", default=[32],
                         help="sentence-transformers batch sizes; the ratio uses the fastest")
    compare.add_argument("-latency_compare", action="store_true",
                         help="instead of the sweep: single-sentence latency of the server beside bare ONNX Runtime, "
                              "our Encoder in-process and sentence-transformers, taking turns (-latency_requests each)")
    compare.add_argument("-baseline_checkout", type=Path, default=None, metavar="DIR",
                         help="with -latency_compare: also run the server of the checkout in DIR (another commit, "
                              "e.g. from `git worktree add`) and let it take turns with the others")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags, with a preset's values as the defaults that explicit flags override."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset:
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("num_sentences", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"-{name} must be at least 1")
    if args.baseline_checkout is not None:
        if not args.latency_compare:
            parser.error("-baseline_checkout takes part in -latency_compare (or -preset latency_bar) only")
        if not (args.baseline_checkout / "app.py").is_file():
            parser.error(f"-baseline_checkout {args.baseline_checkout}: no app.py there (give a checkout of this "
                         "project, e.g. from `git worktree add /tmp/base HEAD~1`)")
    return args


def server_args(args: argparse.Namespace, model_dir: str | None, max_seq_len: int, num_worker: int,
                dtype: str) -> list[str]:
    cli = ["-max_seq_len", str(max_seq_len), "-num_worker", str(num_worker), "-dtype", dtype,
           "-pooling_layer", str(args.pooling_layer)]
    if model_dir:
        cli += ["-model_dir", model_dir]
    if args.device == "cpu":
        cli.append("-cpu")
    for name in ("max_batch_size", "max_batch_tokens", "cpu_threads", "output_dtype", "cpu_engine"):
        if getattr(args, name) is not None:
            cli += [f"-{name}", str(getattr(args, name))]
    return cli


def others_note(row: Row) -> str:
    return f" (other processes used {row.other_cpu[-1]:.0%} of the CPU)" if row.other_cpu else ""


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


class Benchmark:
    """The sweep: servers in the outer loops, client settings inside, rows printed as they finish."""

    def __init__(self, args: argparse.Namespace, model_dir: str | None, sentences: list[str]) -> None:
        self.args = args
        self.model_dir = model_dir
        self.sentences = sentences
        self.warmup_sentences = sentences[:max(1, min(args.warmup, len(sentences)))]
        self.rows: list[Row] = []
        self.st: SentenceTransformersRunner | None = None
        self.on_row: Callable[[Row], None] = lambda row: None

    def run(self) -> list[Row]:
        a = self.args
        for length in a.max_seq_len:
            compare_here = a.compare  # sentence-transformers once per max_seq_len, beside the first server
            for dtype in a.dtype:
                for workers in a.num_worker:
                    self.run_server(length, dtype, workers, compare_here)
                    compare_here = False
        return self.rows

    def run_server(self, length: int, dtype: str, workers: int, compare: bool) -> None:
        a = self.args
        cli = server_args(a, self.model_dir, length, workers, dtype)
        http_port = free_port() if set(a.protocol) - {"zmq"} else None
        if http_port:
            cli += ["-http_port", str(http_port)]
        progress(f"starting server: {' '.join(cli)}")
        with RunningServer(cli, ready_timeout=SERVER_READY_TIMEOUT, device="auto") as server:  # cli names it
            doors = [Door(p, server.port if p == "zmq" else http_port) for p in a.protocol]
            label = f"max_seq_len={length} dtype={dtype} num_worker={workers}"
            progress(f"{label}: warm-up ({len(self.warmup_sentences)} sentences)")
            service_warm = service_vectors(server.port, self.warmup_sentences)
            shown_dtype = effective_dtype(dtype, a.device)
            points = [(door, Row(PROTOCOL_KINDS[door.protocol][0], length, shown_dtype, workers, batch, clients,
                                 len(self.sentences)))
                      for batch in a.client_batch_size for clients in a.num_client for door in doors]
            st_rows = self.start_comparison(length, dtype, service_warm) if compare else []
            meter = CpuMeter(lambda: [os.getpid(), *group_pids(server.process.pid)])
            # Repeats outermost: every point and sentence-transformers take turns, so a burst of load
            # from elsewhere on the machine lands on all of them rather than on one.
            for rep in range(a.repeat):
                for door, row in points:
                    self.measure(row, meter, lambda: client_throughput(
                        door, self.sentences, row.client_batch_size, row.num_client, a.max_in_flight))
                    progress(f"repeat {rep + 1}/{a.repeat} {label} {door.protocol} client_batch_size="
                             f"{row.client_batch_size} num_client={row.num_client}: {row.runs[-1]:,.0f} sent/s"
                             f"{others_note(row)}")
                for row in st_rows:
                    self.measure(row, meter, lambda: self.st.throughput(self.sentences, length, row.client_batch_size))
                    progress(f"repeat {rep + 1}/{a.repeat} sentence-transformers max_seq_len={length} "
                             f"batch_size={row.client_batch_size}: {row.runs[-1]:,.0f} sent/s{others_note(row)}")
            for row in [row for _, row in points] + st_rows:
                self.add(row)
            if a.latency_requests > 0:
                self.measure_latency(doors, label, Row("", length, shown_dtype, workers, 1, 1, a.latency_requests),
                                     meter)

    def measure_latency(self, doors: list[Door], label: str, template: Row, meter: CpuMeter) -> None:
        """Single-sentence latency through each door; with several doors, in -repeat rounds that take
        turns, so load from elsewhere on the machine falls on all of them alike."""
        a = self.args
        rounds = a.repeat if len(doors) > 1 else 1
        per_round = max(1, a.latency_requests // rounds)
        progress(f"{label}: latency of {per_round * rounds} single-sentence requests per door")
        rows = [dataclasses.replace(template, kind=PROTOCOL_KINDS[door.protocol][1], sentences=per_round * rounds,
                                    runs=[], other_cpu=[]) for door in doors]
        for _ in range(rounds):
            for door, row in zip(doors, rows):
                self.measure(row, meter, lambda: single_sentence_latencies(door, self.sentences, per_round))
        for row in rows:
            self.add(row)

    def measure(self, row: Row, meter: CpuMeter, run: Callable[[], float | list[float]]) -> None:
        """One timed measurement into `row`, with the CPU share other processes took meanwhile.

        With -retry_noisy, a measurement during which others took more than QUIET_SHARE of the CPU
        is taken again (up to that many times) and the quietest attempt kept: on a shared machine
        a single burst of someone else's work would otherwise decide a ratio.
        """
        a = self.args
        attempts: list[tuple[float, Any]] = []
        for attempt in range(1 + a.retry_noisy):
            if a.wait_quiet > 0:
                meter.wait_until_quiet(a.wait_quiet, QUIET_SHARE)
            meter.start()
            value = run()
            share = meter.stop()
            attempts.append((1.0 if share is None else share, value))
            if share is None or share <= QUIET_SHARE:
                break
            if attempt < a.retry_noisy:
                progress(f"discarded a {row.kind} measurement: other processes used {share:.0%} of the CPU")
        share, value = min(attempts, key=lambda item: item[0])
        row.runs.extend(value if isinstance(value, list) else [value])
        if meter.available:
            row.other_cpu.append(share)

    def start_comparison(self, length: int, dtype: str, service_warm: np.ndarray) -> list[Row]:
        """Load sentence-transformers (once), warm it up, and check it computes what the server does."""
        a = self.args
        if self.st is None:
            progress("loading sentence-transformers")
            from bert.checkpoint import bundled_model_dir
            self.st = SentenceTransformersRunner(self.model_dir or str(bundled_model_dir()), a.device, dtype)
        progress(f"sentence-transformers warm-up ({len(self.warmup_sentences)} sentences)")
        st_warm = self.st.encode(self.warmup_sentences, length, a.st_batch_size[0])
        cosine = mean_cosine(service_warm, st_warm)
        # Same model, same sentences: anything but ~1.0 means the two are not doing the same work.
        print(f"# max_seq_len {length}: service and sentence-transformers vectors agree to mean cosine {cosine:.5f}",
              flush=True)
        return [Row("sentence-transformers", length, effective_dtype(dtype, a.device), None, bs, None,
                    len(self.sentences)) for bs in a.st_batch_size]

    def add(self, row: Row) -> None:
        self.rows.append(row)
        self.on_row(row)


# ---------------------------------------------------------------- one sentence, side by side

SERVER_PATH = "server (BertClient)"
BARE_PATH = "bare onnxruntime"
BARE_PROCESS_PATH = "bare onnxruntime, own process"
LATENCY_BLOCK = 20  # timed one-sentence calls per path per turn


def bare_onnx_graph(model_dir: str, folder: Path) -> Path:
    """The Hugging Face model exported with eager attention, so that ONNX Runtime's transformer
    optimizer fuses it (Attention, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu):
    the fastest graph a user would build by hand. Built once into `folder`, reused after."""
    import hashlib
    import warnings

    import onnxruntime
    import torch

    weights = sorted(p.stat().st_size for p in Path(model_dir).glob("*.safetensors")) or [0]
    key = hashlib.sha256(f"{Path(model_dir).resolve()}|{weights}|{torch.__version__}|{onnxruntime.__version__}"
                         .encode()).hexdigest()[:16]
    path = folder / f"bare-{key}.onnx"
    if path.is_file():
        return path
    from onnxruntime.transformers import optimizer
    from transformers import AutoModel

    progress(f"exporting {model_dir} for bare ONNX Runtime into {path}")
    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()

    class LastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):  # noqa: ANN001 (traced)
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]])
    raw = folder / f"bare-{key}.raw.onnx"
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(LastHidden(), (ids, (ids != 0).long(), torch.zeros_like(ids)), str(raw), input_names=names,
                          output_names=["hidden"], dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names + ["hidden"]},
                          opset_version=17, dynamo=False)
    fused = optimizer.optimize_model(str(raw), model_type="bert", num_heads=model.config.num_attention_heads,
                                     hidden_size=model.config.hidden_size)
    fused.save_model_to_file(str(path))
    raw.unlink()
    return path


class BareOnnxRuntime:
    """What a user gets from ONNX Runtime alone: `tokenizers`, one session, mean pooling and L2
    normalisation in numpy (the bundled model's pooling)."""

    def __init__(self, model_dir: str, max_seq_len: int, threads: int, folder: Path) -> None:
        import onnxruntime
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=max_seq_len)
        self.tokenizer.enable_padding()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(bare_onnx_graph(model_dir, folder)), options,
                                                    providers=["CPUExecutionProvider"])

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        hidden = self.session.run(None, {"input_ids": ids, "attention_mask": mask,
                                         "token_type_ids": np.zeros_like(ids)})[0]
        mean = (hidden * mask[..., None]).sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1)
        return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def serve_bare_onnx_runtime(model_dir: str, max_seq_len: int, threads: int, folder: Path, port: int,
                            ready: Any) -> None:
    """The body of `BareOnnxRuntimeProcess`'s process: JSON texts in, float32 vectors out, until killed."""
    import zmq

    bare = BareOnnxRuntime(model_dir, max_seq_len, threads, folder)
    socket = zmq.Context().socket(zmq.REP)
    socket.bind(f"tcp://127.0.0.1:{port}")
    ready.set()
    while True:
        texts = json.loads(socket.recv())
        socket.send(np.ascontiguousarray(bare.encode(texts), dtype=np.float32))


class BareOnnxRuntimeProcess:
    """Bare ONNX Runtime in a process of its own, the client talking to it directly (ZeroMQ REQ/REP,
    no broker, no checks): what the model costs out of the caller's process before any server code,
    the floor under every server's latency on the machine."""

    def __init__(self, model_dir: str, max_seq_len: int, threads: int, folder: Path) -> None:
        import multiprocessing

        import zmq

        bare_onnx_graph(model_dir, folder)  # exported here, once: the process loads the file
        port, spawn = free_port(), multiprocessing.get_context("spawn")
        ready = spawn.Event()
        self.process = spawn.Process(target=serve_bare_onnx_runtime, name="bare-onnxruntime", daemon=True,
                                     args=(model_dir, max_seq_len, threads, folder, port, ready))
        self.process.start()
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.REQ)
        self.socket.setsockopt(zmq.RCVTIMEO, int(CLIENT_TIMEOUT * 1000))
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(f"tcp://127.0.0.1:{port}")
        if not ready.wait(SERVER_READY_TIMEOUT):
            self.close()
            raise RuntimeError("bare ONNX Runtime did not start in its process")

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.socket.send(json.dumps(list(texts)).encode())
        return np.frombuffer(self.socket.recv(), dtype=np.float32).reshape(len(texts), -1)

    def close(self) -> None:
        self.socket.close()
        self.context.term()
        self.process.kill()
        self.process.join(timeout=10)

    def __enter__(self) -> "BareOnnxRuntimeProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def alternating_latencies(paths: dict[str, Callable[[list[str]], Any]], sentences: Sequence[str], n: int,
                          block: int = LATENCY_BLOCK, settle: int = 3) -> dict[str, list[float]]:
    """Milliseconds per one-sentence call of each path. The paths take turns in blocks of `block`
    calls, so a burst of load from elsewhere on the machine falls on all of them alike; the first
    `settle` calls of a block are not timed: the previous path's thread pools (ONNX Runtime's and
    OpenMP's spin after each call) are still leaving the cores then, which no single-engine user sees.
    The order of the paths is drawn afresh every round (seeded: the same every run), so that no path
    always follows the same one: in a fixed order, a server that always ran right after another
    server was 0.2-0.4 ms slower at p50 than in the other place (two commits' servers swapped between
    runs, 2 cores). (An order reversing every round would give the first and the last path two
    blocks in a row at every other round's start.)"""
    times: dict[str, list[float]] = {name: [] for name in paths}
    names, index, order = list(paths), 0, np.random.default_rng(0)
    while any(len(t) < n for t in times.values()):
        for name in (names[i] for i in order.permutation(len(names))):
            encode = paths[name]
            for k in range(settle + min(block, n - len(times[name]))):
                text = [sentences[index % len(sentences)]]
                index += 1
                start = time.perf_counter()
                encode(text)
                if k >= settle:
                    times[name].append((time.perf_counter() - start) * 1000)
    return times


def p50_ratio_interval(server: Sequence[float], bare: Sequence[float], block: int = LATENCY_BLOCK,
                       draws: int = 2000) -> tuple[float, float]:
    """A 95% interval for p50(server) / p50(bare): the calls were timed in turns of `block` per
    path, so turn i of one path and turn i of the other met the same moment of the machine's load;
    whole turns are drawn with replacement (a bootstrap), and the ratio of the pooled medians is
    taken each time. A bar inside the interval is a verdict the machine's noise can flip."""
    turns = min(len(server), len(bare)) // block
    if turns < 2:
        return math.nan, math.nan
    a = np.asarray(server[:turns * block]).reshape(turns, block)
    b = np.asarray(bare[:turns * block]).reshape(turns, block)
    picks = np.random.default_rng(0).integers(0, turns, size=(draws, turns))
    ratios = np.median(a[picks].reshape(draws, -1), axis=1) / np.median(b[picks].reshape(draws, -1), axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def latency_ratio_checks(rows: Sequence[Row], max_p50: float, max_p99: float) -> list[BarCheck]:
    by_kind = {r.kind: r for r in rows}
    server, bare = by_kind.get(f"latency/{SERVER_PATH}"), by_kind.get(f"latency/{BARE_PATH}")
    if server is None or bare is None:
        return [BarCheck("server and bare ONNX Runtime measured side by side", False, "one of them is missing")]
    checks = []
    for label, q, bar in (("p50", 50, max_p50), ("p99", 99, max_p99)):
        a, b = np.percentile(server.runs, q), np.percentile(bare.runs, q)
        detail = f"{a:.2f} vs {b:.2f} ms = {a / b:.2f}x"
        if q == 50:
            low, high = p50_ratio_interval(server.runs, bare.runs)
            if not math.isnan(low):
                detail += f" (95% interval {low:.2f}x-{high:.2f}x over turns)"
        checks.append(BarCheck(f"single sentence: server {label} <= {bar:g}x bare ONNX Runtime's", a <= bar * b, detail))
    return checks


def run_latency_comparison(args: argparse.Namespace, model_dir: str | None, model_name: str, hardware: str,
                           notes: list[str]) -> int:
    """Single-sentence latency of every path, taking turns; a table, results.csv, and a preset's bars."""
    from bert import Encoder
    from bert.checkpoint import bundled_model_dir
    from service.config import ServerConfig

    folder = model_dir or str(bundled_model_dir())
    length, n = args.max_seq_len[0], max(1, args.latency_requests)
    sentences, _ = corpus_sentences(n + 20, path=args.corpus)
    threads = args.cpu_threads or ServerConfig(num_worker=args.num_worker[0]).threads_per_worker
    cli = server_args(args, model_dir, length, args.num_worker[0], args.dtype[0])
    progress(f"starting server: {' '.join(cli)}")
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(RunningServer(cli, ready_timeout=SERVER_READY_TIMEOUT, device="auto"))
        bc = stack.enter_context(BertClient(port=server.port, timeout=CLIENT_TIMEOUT))
        engine = bc.server_config().get("cpu_engine", "?")
        cache = str(args.out / "onnx_cache")
        progress("loading the in-process paths")
        paths: dict[str, Callable[[list[str]], Any]] = {SERVER_PATH: bc.encode}
        if args.baseline_checkout is not None:
            progress(f"starting the baseline server of {args.baseline_checkout}")
            baseline = stack.enter_context(RunningServer(cli, ready_timeout=SERVER_READY_TIMEOUT, device="auto",
                                                         root=args.baseline_checkout.resolve()))
            paths[f"baseline server ({args.baseline_checkout.name})"] = stack.enter_context(
                BertClient(port=baseline.port, timeout=CLIENT_TIMEOUT)).encode
        paths |= {
            BARE_PATH: BareOnnxRuntime(folder, length, threads, args.out).encode,
            BARE_PROCESS_PATH: stack.enter_context(BareOnnxRuntimeProcess(folder, length, threads, args.out)).encode,
            "Encoder (onnx)": Encoder.from_dir(model_dir, max_seq_len=length, cpu_engine="onnx",
                                               onnx_cache_dir=cache).encode,
            "Encoder (torch)": Encoder.from_dir(model_dir, max_seq_len=length, cpu_engine="torch").encode,
        }
        st = SentenceTransformersRunner(folder, "cpu", "fp32")
        paths["sentence-transformers"] = lambda texts: st.encode(texts, length, 32)
        reference = paths["sentence-transformers"](sentences[:64])
        gaps = {name: float(np.abs(np.asarray(encode(sentences[:64])) - reference).max()) for name, encode in paths.items()}
        progress(f"{n} single-sentence calls per path, taking turns")
        alternating_latencies(paths, sentences, 20, block=LATENCY_BLOCK, settle=0)  # warm-up
        times = alternating_latencies(paths, sentences, n)
    notes = notes + [f"device cpu, {threads} threads per path; {n} one-sentence calls each, in turns of {LATENCY_BLOCK}; "
                     f"max_seq_len {length}; the server runs -cpu_engine {engine}"]
    print("\n".join([f"hardware: {hardware}", f"model:    {model_name}", *notes, ""]))
    print(f"{'path':<30}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'p50 / bare':>12}{'max |v - ST|':>15}")
    bare_p50 = float(np.percentile(times[BARE_PATH], 50))
    rows = []
    for name, runs in times.items():
        p50, p90, p99 = np.percentile(runs, [50, 90, 99])
        print(f"{name:<30}{p50:>9.2f}{p90:>9.2f}{p99:>9.2f}{p50 / bare_p50:>11.2f}x{gaps[name]:>15.1e}")
        rows.append(Row(f"latency/{name}", length, "fp32", args.num_worker[0], 1, 1, n, runs=runs))
    for name in (name for name in times if "server" in name or name == BARE_PROCESS_PATH):
        low, high = p50_ratio_interval(times[name], times[BARE_PATH])
        if not math.isnan(low):
            print(f"{name}: p50 / bare, 95% interval {low:.2f}x-{high:.2f}x (whole turns drawn again, 2,000 times)")
    floor = float(np.percentile(times[BARE_PROCESS_PATH], 50))
    print(f"the model in a process of its own costs {floor / bare_p50:.2f}x of bare ONNX Runtime at p50 on this machine: "
          f"the floor under any server's; this server is {np.percentile(times[SERVER_PATH], 50) / floor:.2f}x of it")
    write_csv(args.out / "results.csv", rows, {"hardware": hardware, "device": "cpu", "model": model_name,
                                                "max_in_flight": 1})
    return report_bars(args.preset, rows, hardware)


def ratio_lines(rows: Sequence[Row]) -> list[str]:
    service = best_by_seq_len([r for r in rows if r.kind == "service"])
    st = best_by_seq_len([r for r in rows if r.kind == "sentence-transformers"])
    return [f"max_seq_len {length}: service {service[length].median:,.0f} sent/s "
            f"({describe_point(service[length])}) / sentence-transformers {st[length].median:,.0f} sent/s "
            f"({describe_point(st[length])}) = {service[length].median / st[length].median:.2f}x"
            for length in sorted(service) if length in st]


def resolve_model(args: argparse.Namespace) -> tuple[str | None, str]:
    """(folder for the server or None for the bundled model, its description)."""
    if args.random_bert_base:
        progress(f"random BERT-base in {args.random_bert_base} (built once, reused after)")
        folder = build_random_bert(args.random_bert_base)
        return str(folder), f"random BERT-base (12 layers, 768 wide, seed 0) in {folder}"
    if args.model_dir:
        return args.model_dir, args.model_dir
    from bert.checkpoint import bundled_model_dir
    return None, f"bundled all-MiniLM-L6-v2 ({bundled_model_dir()})"


def report_bars(preset: str | None, rows: list, hardware: str) -> int:
    """Print the preset's pass/fail lines; the exit code: 0 when every bar passes (or no preset)."""
    if not preset:
        return 0
    checks = BARS[preset](rows)
    print(f"\nbars of {preset} on {hardware}:")
    for check in checks:
        print(f"  {'PASS' if check.passed else 'FAIL'}  {check.name}: {check.detail}")
    return 0 if all(c.passed for c in checks) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    notes = [w for w in [cpu_load_warning()] if w]
    model_dir, model_name = resolve_model(args)
    hardware = describe_hardware(args.device)
    if args.latency_compare:
        return run_latency_comparison(args, model_dir, model_name, hardware, notes)
    sentences, corpus = corpus_sentences(args.num_sentences, path=args.corpus)
    notes.append(f"device {args.device}; {args.num_sentences} sentences per point, median of {args.repeat}, "
                 f"pooling layer {args.pooling_layer}, max_in_flight {args.max_in_flight}"
                 + (f"; preset {args.preset}" if args.preset else ""))
    print(table_header(hardware, model_name, corpus, notes), flush=True)
    context = {"hardware": hardware, "device": args.device, "model": model_name, "max_in_flight": args.max_in_flight}
    csv_path = args.out / "results.csv"
    bench = Benchmark(args, model_dir, sentences)

    def on_row(row: Row) -> None:
        print(table_line(row), flush=True)
        write_csv(csv_path, bench.rows, context)  # after every row, so an interrupted run keeps its results

    bench.on_row = on_row
    started = time.monotonic()
    rows = bench.run()
    sweeps = {"max_seq_len": args.max_seq_len, "client_batch_size": args.client_batch_size,
              "num_client": args.num_client, "num_worker": args.num_worker}
    charts = plot_charts(rows, sweeps, args.out, f"bert-as-service, {model_name.split(' (')[0]}, {hardware}")
    print(f"\nwrote {csv_path} and {', '.join(p.name for p in charts)} in {time.monotonic() - started:.0f} s")
    disturbed = sum(share > QUIET_SHARE for row in rows for share in row.other_cpu)
    if disturbed:
        print(f"\nnote: during {disturbed} of {sum(len(r.other_cpu) for r in rows)} measurements other processes "
              f"took over {QUIET_SHARE:.0%} of the CPU; those numbers are lower than this machine can do")
    if args.compare:
        print("\nservice / sentence-transformers (fastest setting of each):")
        for line in ratio_lines(rows):
            print("  " + line)
    if "zmq" in args.protocol and len(args.protocol) > 1:
        print("\nhttp (openai client) / zmq (BertClient):")
        for line in http_lines(rows):
            print("  " + line)
    return report_bars(args.preset, rows, hardware)


if __name__ == "__main__":
    sys.exit(main())

"""Where one sentence's time goes: a timestamp at every hop of a real server, one clock (issue 13).

    python tools/hop_timeline.py                    # bundled model, one worker, 1,000 one-sentence queries
    python tools/hop_timeline.py -queries 3000 -server_args -cpu_spin no
    python tools/hop_timeline.py -queries 300 -gap_ms 200     # sporadic queries: caches and cores gone cold

The server runs unchanged: a `sitecustomize` module in a temporary folder on its PYTHONPATH wraps a
few of its functions in the broker's and the worker's processes (nothing is traced in a normal run,
and nothing of this is imported by the server itself). Each wrapped call notes `time.perf_counter()`
(CLOCK_MONOTONIC, shared by every process of the machine) in memory; after the queries the tool asks
each process for its notes (SIGUSR2) and lines them up query by query. One BertClient in this
process sends one sentence at a time, with its own marks around each `encode()`.

The marks, in a query's order:
  client_send   BertClient.encode called                     (this process)
  broker_in     the broker's handler gets the request         Broker.on_client_message
  job_sent      the broker starts sending the job             Broker.send_to_worker
  worker_in     the worker's I/O thread has read the job      WorkerSide.recv_multipart
  tokenized     the job's texts are tokenized                 Worker.tokenize_job (returned)
  pass_start    the forward pass starts                       Encoder.vectors (tokenized, padded)
  pass_end      the forward pass returned
  result_sent   the worker starts sending the result          DirectReply.send_multipart
  broker_result the broker's handler gets the result          Broker.on_result
  client_back   BertClient.encode returned                    (this process)

Every mark is taken where a process starts on its part, not where a send returns: a send returns
only when the kernel lets the sender run again, often after the woken process has run, so marks
after sends would come after the marks they caused. Small one-sentence jobs are encoded by the
worker's I/O thread itself (the inline path); that is the path timed here.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.client import BertClient  # noqa: E402
from service.corpus import corpus_sentences  # noqa: E402
from service.harness import ROOT, RunningServer, group_pids  # noqa: E402

WARMUP = 100
# Spans between marks that follow one another in time; each row: (from, to, what happens in between).
SPANS = [
    ("client_send", "broker_in", "client to broker: the client's Python, libzmq's I/O thread, TCP, the broker's wake-up and read"),
    ("broker_in", "job_sent", "the broker's Python: the request's checks, the scheduler, the job's header"),
    ("job_sent", "worker_in", "broker to worker: the link, the worker's wake-up and read"),
    ("worker_in", "tokenized", "worker: the job's JSON and tokenizing"),
    ("tokenized", "pass_start", "worker: the window, the encoder's checks, padding"),
    ("pass_start", "pass_end", "the forward pass"),
    ("pass_end", "result_sent", "worker after the pass: the result framed"),
    ("result_sent", "broker_result", "worker to broker: the link, the broker's wake-up and read"),
    ("broker_result", "client_back", "broker to client: the reply, TCP, libzmq's I/O thread, the client's Python"),
]

# Loaded by every Python process the server starts (the broker, its workers, helpers): wraps the
# functions named above and keeps the marks in memory until SIGUSR2 asks for them.
SITECUSTOMIZE = '''
import os, signal, time

_marks = []
_now = time.perf_counter


def _note(tag):
    _marks.append((tag, _now()))


def _flush(signum, frame):
    folder = os.environ["HOP_TIMELINE_DIR"]
    with open(os.path.join(folder, "marks-%d.txt" % os.getpid()), "w") as f:
        f.writelines("%s %.7f\\n" % mark for mark in _marks)
    open(os.path.join(folder, "done-%d" % os.getpid()), "w").close()


def _install():
    from service import broker, link, protocol, worker

    def around(cls, name, before=None, after=None):
        original = getattr(cls, name)

        def wrapped(*args, **kwargs):
            if before:
                before(*args)
            result = original(*args, **kwargs)
            if after:
                after(result, *args)
            return result
        setattr(cls, name, wrapped)

    around(broker.Broker, "on_client_message", before=lambda *a: _note("broker_in"))
    around(broker.Broker, "on_result", before=lambda *a: _note("broker_result"))
    around(link.WorkerSide, "recv_multipart", after=lambda frames, *a: frames[0] == protocol.JOB and _note("worker_in"))
    around(worker.DirectReply, "send_multipart", before=lambda *a: _note("result_sent"))
    around(broker.Broker, "send_to_worker",
           before=lambda self, slot, frames: frames[0] == protocol.JOB and _note("job_sent"))
    around(worker.Worker, "tokenize_job", after=lambda *a: _note("tokenized"))

    def traced_encoder(result, *args):
        passes = result.vectors

        def vectors(batch, *args):
            _note("pass_start")
            out = passes(batch, *args)
            _note("pass_end")
            return out
        result.vectors = vectors
    around(worker, "load_encoder", after=traced_encoder)


if os.environ.get("HOP_TIMELINE_DIR"):
    signal.signal(signal.SIGUSR2, _flush)
    _install()
'''


def run(queries: int, server_args: list[str], gap: float = 0.0) -> dict[str, np.ndarray]:
    """Every mark's times (seconds), `queries` of each, in query order; `gap` seconds between queries."""
    sentences, _ = corpus_sentences(WARMUP + queries)
    with tempfile.TemporaryDirectory(prefix="hop-timeline-") as folder:
        Path(folder, "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
        path = os.pathsep.join([folder, str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        env = {"HOP_TIMELINE_DIR": folder, "PYTHONPATH": path}
        marks: dict[str, list[float]] = {"client_send": [], "client_back": []}
        with RunningServer(["-num_worker", "1", *server_args], env=env) as server, \
                BertClient(port=server.port, timeout=60) as client:
            for text in sentences[:WARMUP]:
                client.encode([text])
            for text in sentences[WARMUP:]:
                if gap:
                    time.sleep(gap)
                marks["client_send"].append(time.perf_counter())
                client.encode([text])
                marks["client_back"].append(time.perf_counter())
            pids = group_pids(server.process.pid)
            for pid in pids:
                os.kill(pid, signal.SIGUSR2)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and len(list(Path(folder).glob("done-*"))) < len(pids):
                time.sleep(0.05)
        for file in Path(folder).glob("marks-*.txt"):
            for line in file.read_text().splitlines():
                tag, moment = line.split()
                marks.setdefault(tag, []).append(float(moment))
    missing = [tag for start, end, _ in SPANS for tag in (start, end) if len(marks.get(tag, [])) < queries]
    if missing:
        raise RuntimeError(f"too few marks for {', '.join(missing)}: did the queries take the inline path?")
    return {tag: np.array(times[-queries:]) for tag, times in marks.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-queries", type=int, default=1000, help="timed one-sentence queries (after 100 untimed)")
    parser.add_argument("-gap_ms", type=float, default=0.0,
                        help="pause between queries (sporadic traffic: cores asleep, caches cold); default none")
    parser.add_argument("-server_args", nargs=argparse.REMAINDER, default=[],
                        help="passed to app.py (which already gets -cpu -num_worker 1 and a free port)")
    args = parser.parse_args()
    marks = run(args.queries, args.server_args, args.gap_ms / 1000)
    shown = " ".join(["-cpu -num_worker 1", *args.server_args])
    gap = f", {args.gap_ms:g} ms apart" if args.gap_ms else ", back to back"
    print(f"{args.queries} one-sentence queries to app.py {shown}{gap}; ms per query")
    print(f"{'span':28s} {'p50':>7s} {'mean':>7s} {'p90':>7s}")
    for start, end, what in SPANS:
        print_row(f"{start} -> {end}", (marks[end] - marks[start]) * 1000, what)
    total = (marks["client_back"] - marks["client_send"]) * 1000
    print_row("whole call", total)
    print_row("outside the pass", total - (marks["pass_end"] - marks["pass_start"]) * 1000)
    return 0


def print_row(name: str, ms: np.ndarray, what: str = "") -> None:
    print(f"{name:28s} {np.median(ms):7.3f} {ms.mean():7.3f} {np.percentile(ms, 90):7.3f}  {what}".rstrip())


if __name__ == "__main__":
    sys.exit(main())

"""A worker process: loads the model once, then turns jobs from the broker into vectors.

Three stages joined by queues keep the device busy:

    I/O (main thread)  --jobs-->  tokenize thread  --token batches-->  compute thread  --results--> I/O

The I/O thread owns the only connection to the broker (a link to this host's broker, see
service/link.py, or a ZeroMQ socket to a head; neither is thread-safe): it passes
jobs on, sends results back, and exchanges heartbeats. Tokenizing the next jobs overlaps the forward
pass of the current ones, and everything tokenized while the model was busy is merged into one
length-sorted set of forward passes. A batch that fails fails every job in it; the worker lives on,
except after a CUDA error, which poisons the process: it exits and the broker re-sends its jobs.

A stage thread that dies (a CUDA error, or any exception its loop does not handle) ends the process
too, for the same reason. Heartbeats say that work moves, not only that the I/O thread is alive:
while a job is in hand and no stage has moved any job on (tokenized it, or finished a forward pass,
of which a large window has many) for `-stall_timeout` seconds, the I/O thread stops sending them,
and the broker replaces the worker and re-sends its jobs.

The I/O thread encodes small jobs itself when the stages are idle, and queries (one-job requests of
a few sentences) even when they are not, beside the bulk window's forward passes: see
`Worker.runs_inline`. On a GPU their passes run on a high-priority stream (`Encoder.encode_tokens`),
and the queries waiting on the link are taken into one window (see `QUERIES_GATHERED`).
"""
from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import zmq

from . import protocol as P
from .backend import jobs_wanted
from .client import ERR_SERVER, ERR_TIMEOUT
from .config import ServerConfig
from .lanes import BULK, SMALL, Empty, TwoLanes
from .link import PolledByFd, WorkerSide, poll_key
from .logs import configure_logging

log = logging.getLogger(__name__)

CUDA_ERROR_EXIT_CODE = 70
STAGE_DIED_EXIT_CODE = 71
# Batches of ever-changing shapes fragment glibc's heap: without giving freed memory back, a CPU
# worker's RSS grew from 340 MB to 1.3 GB in 7 minutes. A trim costs ~12 ms, so at most every 2 s.
MALLOC_TRIM_INTERVAL = 2.0
# In a CPU worker every thread but the I/O thread, which answers queries, runs this much above its
# nice value: the tokenize and compute threads (bulk work) and the pools the libraries started
# (ONNX Runtime's, which spins ~50 ms after each pass, and the tokenizer's). Measured on 2 vCPUs:
# - a query the I/O thread encodes beside a bulk pass (`Worker.runs_inline`) gets most of a core
#   rather than a third of two: p50 behind a bulk stream 9.4-10.2 ms with every thread at the same
#   value, 5.1-7.9 ms with the compute thread 5 above (7 runs each, taking turns);
# - a query on an idle server: its hops on the way back preempt ONNX Runtime's spinning thread
#   sooner. With the pools 5 above as well, p50 2-6% lower in 4 runs of `benchmark.py -preset
#   latency_bar -baseline_checkout` and 0-4% in 4 runs of two servers taking turns;
# - bulk throughput with the server alone on the machine did not move beyond the noise (+-5%).
# Beside other busy processes, bulk work gets less of the CPU than it would at the same value: it is
# the work that can wait. (Raising one's own nice needs no privilege; lowering it back does.)
BACKGROUND_NICE = 5
# On a GPU the I/O thread takes the queries already waiting on the link into one window, up to this
# many: as many one-sentence queries as the largest CUDA graph holds (bert/cuda_graphs.py), so they
# cost one replay instead of one each, while a window too wide for any graph would run eagerly (~5x
# a replay's time on an H200). On a CPU a pass costs in proportion to its tokens, so each query is
# encoded as soon as it is read.
QUERIES_GATHERED = 8


def _malloc_trim() -> Callable[[], object]:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return lambda *_: None


@dataclass
class Job:
    job_id: int
    deadline: float | None
    is_tokenized: bool
    show_tokens: bool
    payload: bytes
    tokens: Any = None          # TokenBatch once tokenized
    error: str | None = None
    lane: str = BULK            # SMALL for a query (the broker's JOB header says), which the stages take first

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


class FatalDeviceError(RuntimeError):
    """A device error after which this process cannot compute again (raised out of the compute loop)."""


class InjectedFault(RuntimeError):
    """A fault armed on purpose (see `Worker.injected_fault`), to drill or test recovery."""


def cut_texts(texts: Any, max_chars: int) -> Any:
    """`texts` with every string cut to `max_chars` characters, at any depth (a text, a pair of texts,
    a list of WordPiece tokens), so that one huge string cannot make tokenizing cost memory and time
    in proportion to its size, when at most max_seq_len tokens of it are used."""
    if isinstance(texts, str):
        return texts[:max_chars]
    if isinstance(texts, list):
        return [cut_texts(item, max_chars) for item in texts]
    return texts


def lower_to_background(tid: int | None = None) -> None:
    """Give thread `tid` of this process (default: the calling one) the nice value of bulk work:
    BACKGROUND_NICE above the process's main thread, the I/O thread (so a server started under
    `nice` keeps its place). Linux schedules threads one by one; elsewhere the whole process's value
    would change, so nothing is done there."""
    if not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id() if tid is None else tid
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + BACKGROUND_NICE))
    except ProcessLookupError:  # the thread ended meanwhile
        pass
    except OSError as e:  # a sandbox that forbids it: bulk work and queries then share the cores evenly
        log.warning("cannot lower the priority of thread %d of the worker (%s); queries beside bulk work wait "
                    "longer", tid, e)


def library_threads() -> list[int]:
    """The ids of this process's threads but the calling one and libzmq's (Linux; elsewhere none).
    libzmq's carry the I/O thread's messages where its link to the broker is a ZeroMQ socket (a
    worker of another host), so they keep the I/O thread's priority."""
    if not os.path.isdir("/proc/self/task"):
        return []
    found = []
    for tid in map(int, os.listdir("/proc/self/task")):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read()
        except OSError:  # ended meanwhile
            continue
        if tid != threading.get_native_id() and not name.startswith("ZMQbg"):
            found.append(tid)
    return found


def _nothing() -> None:
    pass


def _take(path: str) -> bool:
    """Remove the file at `path`; True only for the one caller that removed it."""
    try:
        os.unlink(path)
    except OSError:
        return False
    return True


class DirectReply:
    """Stands in for the compute thread's results socket when the I/O thread encodes a job itself:
    what it is given goes straight to the broker as a RESULT."""

    def __init__(self, socket: zmq.Socket | WorkerSide) -> None:
        self.socket = socket

    def send_multipart(self, frames: list, copy: bool = True) -> None:
        self.socket.send_multipart([P.RESULT, *frames], copy=copy)


def pick_device(config: ServerConfig, index: int) -> str:
    """Worker `index`'s device: GPUs round-robin over `device_map` (or all visible), else the CPU."""
    if config.cpu:
        return "cpu"
    import torch
    if not torch.cuda.is_available():
        return "cpu"
    gpus = config.device_map or tuple(range(torch.cuda.device_count()))
    return f"cuda:{gpus[index % len(gpus)]}"


def cpu_threads(config: ServerConfig) -> int:
    """Divide the cores between workers rather than let each use all of them (oversubscription)."""
    return config.threads_per_worker


def worker_main(config: ServerConfig, index: int, link_path: str, parent_pid: int) -> None:
    """Entry point of a worker process (started with the 'spawn' method by the broker), which links
    to the broker at `link_path` (see service/link.py)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the broker decides
    configure_logging(config.verbose)
    threads = cpu_threads(config)
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # before `tokenizers` is imported
    context = zmq.Context()  # for the compute thread's results, in-process
    socket = WorkerSide.connect(link_path)
    try:
        encoder = load_encoder(config, index, threads)
    except Exception as e:  # any failure to load is reported, then this process ends
        log.debug("model loading failed", exc_info=True)
        socket.send_multipart([P.FAILED, P.dumps({"message": f"{type(e).__name__}: {e}"})])
        socket.close()
        context.term()
        raise SystemExit(2)
    info = {"pid": os.getpid(), "device": str(encoder.device), "encoder": encoder.describe(), "threads": threads,
            "capacity": jobs_wanted(str(encoder.device))}
    socket.send_multipart([P.READY, P.dumps(info)])
    log.info("worker %d ready on %s (%s)", index, encoder.device, str(encoder.dtype).removeprefix("torch."))
    try:
        Worker(encoder, config, socket, context, parent_pid).run()
    finally:
        socket.close()
        context.term()


def load_encoder(config: ServerConfig, index: int, threads: int):
    """Build the encoder on this worker's device and run it once before the worker says READY: a
    device that cannot run the model fails start-up with its error instead of the first request,
    and the first client does not pay for CUDA's and oneDNN's one-time set-up."""
    import dataclasses

    import torch

    from bert.encoder import Encoder

    device = pick_device(config, index)
    if device == "cpu":
        torch.set_num_threads(threads)
    else:
        torch.cuda.set_device(torch.device(device))
    encoder = Encoder.from_options(dataclasses.replace(config.encoder, device=device))
    encoder.encode(["warm-up", "a second, longer sentence to warm up with"])
    return encoder


class Worker:
    def __init__(self, encoder, config: ServerConfig, socket: zmq.Socket | WorkerSide, context: zmq.Context,
                 parent_pid: int) -> None:
        self.encoder = encoder
        self.config = config
        self.socket = socket
        self.context = context
        self.parent_pid = parent_pid
        self.jobs: TwoLanes[Job] = TwoLanes()
        self.tokenized: TwoLanes[Job] = TwoLanes()
        # Each counter has one writer (the I/O and the tokenize thread), so no lock is needed.
        self.jobs_received = self.jobs_tokenized = 0
        # On a CPU the model and the tokenizer share the cores, so overlapping them gains nothing;
        # waiting for every job already received gives one larger length-sorted window instead
        # (2,000 sentences in 256-sentence jobs: 5.5% padding instead of 10%, and 1,000-sentence windows).
        self.window_waits_for_tokenizer = encoder.device.type == "cpu"
        self.results_address = f"inproc://results-{id(self)}"
        # Every text, a pair's and a token list's too, is cut to the tokenizer's bound (100 characters
        # per token of max_seq_len) before tokenizing: memory then follows what the model can use, not
        # what the client sent (a 10 MB sentence took a worker from 351 MB to 1.34 GB).
        self.max_chars = encoder.tokenizer.max_chars
        # Set once by a stage thread that died, read by the I/O thread: the exit code to end with.
        self.stage_exit_code: int | None = None
        # When a stage last moved a job on (monotonic clock); written by the stage threads and read by
        # the I/O thread: a float assignment is atomic under the GIL, and a late read only delays.
        self.progress_at = time.monotonic()
        # On a CPU bulk work runs below the I/O thread's priority (BACKGROUND_NICE); a GPU does the
        # bulk work's arithmetic, and its queries go ahead there by stream priority instead.
        self.on_cpu = encoder.device.type == "cpu"
        self.queries_gathered = 1 if self.on_cpu else QUERIES_GATHERED
        self.direct_reply = DirectReply(socket)
        self.inline_trim, self.inline_last_trim = _malloc_trim(), time.monotonic()

    def run(self) -> None:
        # The ~170,000 objects of the model and its libraries live as long as the process: frozen, the
        # garbage collector stops walking them, and a full collection takes 64 ms -> ~0 (a request that
        # met one waited that long).
        gc.freeze()
        if self.on_cpu:  # the pools the libraries started while the model loaded: see BACKGROUND_NICE
            for tid in library_threads():
                lower_to_background(tid)
        # After that: a context's first socket starts libzmq's threads, which name themselves only
        # once running, and they are to keep this thread's priority.
        results = self.context.socket(zmq.PAIR)
        results.bind(self.results_address)
        stages = [self.start_stage("tokenize", self.tokenize_loop), self.start_stage("compute", self.compute_loop)]
        try:
            self.io_loop(results)
        except ConnectionError:  # the link to this host's broker closed (service/link.py): it is gone
            log.warning("broker is gone; worker exits")
        finally:
            self.jobs.put(None)
            for stage in stages:
                stage.join(timeout=30)
            results.close(linger=0)

    def start_stage(self, name: str, loop: Callable[[], None]) -> threading.Thread:
        thread = threading.Thread(target=self.run_stage, args=(name, loop), name=name, daemon=True)
        thread.start()
        return thread

    def run_stage(self, name: str, loop: Callable[[], None]) -> None:
        """Run a stage's loop; if it dies, tell the I/O thread to end the process: the jobs this
        stage held would otherwise wait forever on a worker that still answers heartbeats."""
        if self.on_cpu:
            lower_to_background()  # bulk work, which a query on the I/O thread goes ahead of
        try:
            loop()
        except BaseException as e:  # whatever it was, this stage is gone and the process is not whole
            log.critical("the %s thread died (%s: %s); the worker exits so the broker re-sends its jobs",
                         name, type(e).__name__, e, exc_info=not isinstance(e, (FatalDeviceError, InjectedFault)))
            self.stage_exit_code = CUDA_ERROR_EXIT_CODE if isinstance(e, FatalDeviceError) else STAGE_DIED_EXIT_CODE

    def mark_progress(self) -> None:
        self.progress_at = time.monotonic()

    def injected_fault(self, stage: str) -> None:
        """Fault injection, for drills and tests: with $BERT_SERVING_FAULT_DIR set (`fault_dir`), a file
        named `tokenize` or `compute` in that folder makes that stage's thread raise on its next job
        (the worker then exits), and one named `stall` makes the compute thread hang (the worker stops
        heartbeating after -stall_timeout). Each file is removed by the one worker it trips."""
        if self.config.fault_dir is None:
            return
        if _take(os.path.join(self.config.fault_dir, stage)):
            raise InjectedFault(f"fault injected in the {stage} thread ({self.config.fault_dir}/{stage})")
        if stage == "compute" and _take(os.path.join(self.config.fault_dir, "stall")):
            log.warning("fault injected: the compute thread hangs (%s/stall)", self.config.fault_dir)
            threading.Event().wait()  # like a device call that never returns

    # ------------------------------------------------------------ I/O thread

    def io_loop(self, results: zmq.Socket) -> None:
        in_flight = 0  # jobs handed to the stages, their results awaited
        # The stages' results by their socket's fd: no system calls for it at the turns of a small job
        # this thread encodes itself (see PolledByFd).
        staged = PolledByFd(results, lambda: in_flight > 0)
        poller, link = zmq.Poller(), zmq.Poller()
        poller.register(poll_key(self.socket), zmq.POLLIN)
        poller.register(staged.fd, zmq.POLLIN)
        link.register(poll_key(self.socket), zmq.POLLIN)  # the broker's messages only: what else waits
        broker = poll_key(self.socket)
        broker_seen = next_heartbeat = next_parent_check = time.monotonic()
        stopping = stalled = False
        while True:
            events = dict(poller.poll(0 if staged.has_message() else int(P.HEARTBEAT_INTERVAL * 250)))
            now = time.monotonic()
            if self.stage_exit_code is not None:
                os._exit(self.stage_exit_code)  # the threads of a broken process are not joined
            if broker in events:
                broker_seen = now
                inline: list[Job] = []  # jobs this thread encodes itself, in one window
                while True:
                    frames = self.socket.recv_multipart(copy=True)
                    if frames[0] == P.JOB:
                        job = job_from(frames, now)
                        if in_flight == 0:
                            self.mark_progress()  # an idle worker's stall clock starts with its first job
                        if self.runs_inline(job, idle=in_flight == 0):
                            inline.append(job)
                        else:
                            self.accept(job)
                            in_flight += 1
                    elif frames[0] == P.STOP:
                        log.debug("stop received; finishing %d jobs", in_flight)
                        stopping = True
                    if not (inline and len(inline) < self.queries_gathered and link.poll(0)):
                        break
                if inline:
                    self.run_inline(inline)
            if staged.has_message(staged.fd in events):
                frames = results.recv_multipart(copy=False)
                self.socket.send_multipart([P.RESULT, *frames], copy=False)
                in_flight -= 1
            if stopping and in_flight == 0:
                return
            stalled = self.check_stall(in_flight, now, stalled)
            if now >= next_heartbeat and not stalled:
                self.socket.send_multipart([P.HEARTBEAT])
                next_heartbeat = now + P.HEARTBEAT_INTERVAL
            parent_gone = False
            if now >= next_parent_check:  # a system call: once a heartbeat interval, not at every job
                next_parent_check = now + P.HEARTBEAT_INTERVAL
                parent_gone = os.getppid() != self.parent_pid
            if now - broker_seen > P.HEARTBEAT_INTERVAL * P.HEARTBEAT_LIVENESS * 3 or parent_gone:
                log.warning("broker is gone; worker exits")
                return

    def check_stall(self, in_flight: int, now: float, was_stalled: bool) -> bool:
        """Whether the jobs in hand have not moved for -stall_timeout seconds (logged when it changes):
        a stalled worker sends no heartbeats, so the broker replaces it and re-sends its jobs."""
        idle = now - self.progress_at
        stalled = in_flight > 0 and idle > self.config.stall_timeout
        if stalled and not was_stalled:
            log.error("no progress on %d jobs for %.0f s (-stall_timeout %g): heartbeats stop so the broker "
                      "replaces this worker", in_flight, idle, self.config.stall_timeout)
        elif was_stalled and not stalled:
            log.warning("progress again after a stall; heartbeats resume")
        return stalled

    def runs_inline(self, job: Job, idle: bool) -> bool:
        """Whether the I/O thread encodes `job` itself: a small job when the stages are `idle`, since
        handing one sentence to the tokenize and then the compute thread and its result back cost
        more than the tokenizing (issue 13); and a query (the JOB header's query bit) even while the
        stages are busy with bulk jobs. That query's forward pass then runs beside the bulk window's
        instead of waiting for the pass in progress. On a CPU it runs on the same engine (ONNX
        Runtime's session and PyTorch's modules take concurrent calls): behind a bulk stream on 2
        vCPUs, p50 5.3-6.2 ms instead of 22-76 ms (with `BACKGROUND_NICE`). On a GPU it runs on the
        encoder's high-priority stream, where a query passed through the stages waited for every
        pass the compute thread had queued on the device. With fault injection on, every job goes
        through the stages, where the drills' faults are armed."""
        return (len(job.payload) <= P.QUERY_MAX_BYTES and self.config.fault_dir is None
                and (idle or job.lane == SMALL))

    def run_inline(self, jobs: list[Job]) -> None:
        """Tokenize, encode (in one window) and answer `jobs` on this (the I/O) thread. Their passes
        do not move the stall clock, which watches the stages: a compute thread hung in a bulk window
        is found (`check_stall`) however many queries this thread answers meanwhile."""
        for job in jobs:
            self.tokenize_job(job)
        try:
            self.process_window(jobs, self.direct_reply, on_pass=_nothing, urgent=True)
        except FatalDeviceError as e:  # the CUDA context is unusable: as when a stage dies of it
            log.critical("%s; the worker exits so the broker re-sends its jobs", e)
            os._exit(CUDA_ERROR_EXIT_CODE)
        if time.monotonic() - self.inline_last_trim > MALLOC_TRIM_INTERVAL:
            self.inline_trim(0)  # after the reply went out, so no request waits for it
            self.inline_last_trim = time.monotonic()

    def accept(self, job: Job) -> None:
        """Hand a job from the broker to the tokenize thread (called by the I/O thread only)."""
        self.jobs_received += 1
        self.jobs.put(job, job.lane)

    # ------------------------------------------------------------ tokenize thread

    def tokenize_loop(self) -> None:
        while (job := self.jobs.get()[1]) is not None:
            self.injected_fault("tokenize")
            self.tokenize_job(job)
            self.tokenized.put(job, job.lane)
            self.jobs_tokenized += 1
            self.mark_progress()
        self.tokenized.put(None)

    def tokenize_job(self, job: Job) -> None:
        """Fill `job.tokens`, or `job.error` when it expired or its texts cannot be tokenized."""
        if job.expired():
            job.error = ERR_TIMEOUT
        else:
            try:
                texts = json.loads(job.payload.decode("utf-8"))
                if len(job.payload) > self.max_chars:  # else no text in it can be longer (a query's case)
                    texts = cut_texts(texts, self.max_chars)
                job.tokens = self.encoder.tokenize(texts, is_tokenized=job.is_tokenized)
            except Exception as e:  # the broker validated the texts; this is a bug, not bad input
                log.exception("tokenizing job %d failed", job.job_id)
                job.error = f"tokenization failed: {type(e).__name__}: {e}"
        job.payload = b""

    # ------------------------------------------------------------ compute thread

    def compute_loop(self) -> None:
        sender = self.context.socket(zmq.PAIR)
        sender.connect(self.results_address)
        trim, last_trim = _malloc_trim(), time.monotonic()
        try:
            while (window := self.next_window()) is not None:
                self.injected_fault("compute")
                self.mark_progress()
                bulk = window[0].lane == BULK
                if bulk:
                    self.serve_queries(sender)  # one tokenized while this window was gathered
                between_passes = (lambda: self.serve_queries(sender)) if bulk else self.mark_progress
                self.process_window(window, sender, between_passes, urgent=not bulk)
                self.mark_progress()
                if time.monotonic() - last_trim > MALLOC_TRIM_INTERVAL:
                    trim(0)
                    last_trim = time.monotonic()
        finally:
            sender.close(linger=1000)

    def next_window(self) -> list[Job] | None:
        """The jobs merged into one set of forward passes: every job of one lane tokenized so far (at
        least one), and for bulk jobs on a CPU also those still being tokenized. Queries go first
        (service/lanes.py); a window of queries waits for nothing, and a bulk window takes no query
        (one that arrives meanwhile is answered between its passes: `serve_queries`)."""
        lane, first = self.tokenized.get()
        if first is None:
            return None
        window = [first]
        while True:
            wait = self.window_waits_for_tokenizer and lane == BULK and self.jobs_received > self.jobs_tokenized
            try:
                # A query tokenized meanwhile stops the wait: it goes first, then this window.
                job = self.tokenized.get(timeout=1.0 if wait else 0, lane=lane,
                                         interrupt=SMALL if lane == BULK else None)[1]
            except Empty:
                if wait and not self.tokenized.waiting(SMALL):
                    continue
                return window
            if job is None:
                self.tokenized.put(None)  # seen again by the next call, which then ends the loop
                return window
            window.append(job)

    def serve_queries(self, sender: zmq.Socket) -> None:
        """Between two forward passes of a bulk window: encode and answer the queries tokenized since
        (service/lanes.py), so that they wait for one pass, not for the whole window."""
        self.mark_progress()
        if queries := self.tokenized.drain(SMALL):
            self.process_window(queries, sender, urgent=True)

    def process_window(self, window: list[Job], sender: zmq.Socket,
                       on_pass: Callable[[], object] | None = None, urgent: bool = False) -> None:
        """Encode the window's jobs in one set of forward passes and send each its result (or error);
        `on_pass` is called between passes (default: the stall clock's `mark_progress`); `urgent`: a
        window of queries (`Encoder.encode_tokens`)."""
        live = []
        for job in window:
            if job.error is None and job.expired():
                job.error = ERR_TIMEOUT  # its client has given up: do not spend the model on it
            if job.error is not None:
                sender.send_multipart(self.error_frames(job))
            else:
                live.append(job)
        if not live:
            return
        from bert.tokenization import TokenBatch

        started = time.perf_counter()
        try:
            # One job (the usual small request): its own batch, not a copy of it.
            batch = live[0].tokens if len(live) == 1 else TokenBatch.concat([job.tokens for job in live])
            vectors = self.encoder.encode_tokens(batch, on_pass=on_pass or self.mark_progress, urgent=urgent)
        except Exception as e:
            if is_fatal_device_error(e):
                raise FatalDeviceError(f"device error: {e}") from e  # ends the compute thread, then the process
            log.exception("forward pass over %d jobs failed", len(live))
            for job in live:
                job.error = f"encoding failed: {type(e).__name__}: {e}"
                sender.send_multipart(self.error_frames(job))
            return
        if len(live) == 1:  # one job (a query): no shares to work out, and every step counts on cold caches
            sender.send_multipart(self.result_frames(live[0], vectors, (time.perf_counter() - started) * 1000), copy=False)
            return
        # Each job's share of the window's compute time, by its share of the tokens.
        ms_per_token = (time.perf_counter() - started) * 1000 / max(1, sum(int(j.tokens.ids.size) for j in live))
        start = 0
        for job in live:
            n = len(job.tokens)
            part = vectors[start:start + n]
            start += n
            sender.send_multipart(self.result_frames(job, part, ms_per_token * int(job.tokens.ids.size)), copy=False)

    def result_frames(self, job: Job, vectors: np.ndarray, compute_ms: float = 0.0) -> list:
        if vectors.ndim == 3:  # per-token vectors: trim the merged window's padding to this job's longest
            vectors = vectors[:, :int(job.tokens.lengths.max())]
        vectors = np.ascontiguousarray(vectors, dtype=self.config.output_dtype)
        dtype, n_tokens = self.config.output_dtype, int(job.tokens.ids.size)
        if not job.show_tokens:
            return [P.result_header(job.job_id, dtype, vectors.shape, n_tokens, round(compute_ms, 3)), vectors]
        header = {"job": job.job_id, "ok": True, "dtype": dtype, "shape": list(vectors.shape), "n_tokens": n_tokens,
                  "compute_ms": round(compute_ms, 3), "tokens": self.encoder.tokenizer.tokens(job.tokens)}
        return [P.dumps(header), vectors]

    @staticmethod
    def error_frames(job: Job) -> list[bytes]:
        if job.error == ERR_TIMEOUT:
            return [P.dumps({"job": job.job_id, "ok": False, "error": ERR_TIMEOUT,
                             "message": "the client's timeout passed before the request reached the model"})]
        return [P.dumps({"job": job.job_id, "ok": False, "error": ERR_SERVER, "message": job.error})]


def job_from(frames: list, now: float) -> Job:
    """The Job of a JOB message [JOB, header, payload] read at `now` (monotonic clock)."""
    job_id, left, is_tokenized, show_tokens, is_query = P.read_job_header(frames[1])
    # `left` is relative: a worker on another host needs no common clock
    return Job(job_id, None if left is None else now + left, is_tokenized, show_tokens, frames[2],
               lane=SMALL if is_query else BULK)


def is_fatal_device_error(error: Exception) -> bool:
    """CUDA errors other than out-of-memory leave the CUDA context unusable for this process."""
    text = str(error)
    return "CUDA error" in text or "CUBLAS_STATUS" in text or "device-side assert" in text

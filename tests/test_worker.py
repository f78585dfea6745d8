"""The worker's stages without sockets: a real encoder, the real tokenize thread, the merging policy."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch

from bert.tokenization import TokenBatch
from helpers import real_sentences
from service.config import ServerConfig
from service import protocol as P
from service.lanes import BULK, SMALL
from service.worker import Job, Worker


@pytest.fixture
def worker(bundled_encoder):
    """A `Worker` whose tokenize thread runs; jobs go in through `accept`, as from the I/O thread."""
    worker = Worker(bundled_encoder, ServerConfig(), socket=None, context=None, parent_pid=0)
    thread = threading.Thread(target=worker.tokenize_loop, daemon=True)
    thread.start()
    yield worker
    worker.jobs.put(None)
    thread.join(timeout=30)


def receive(worker: Worker, job_id: int, texts: list[str], query: bool = False) -> None:
    """A JOB from the broker, as the I/O thread hands it on (`query`: the header's query flag)."""
    worker.accept(Job(job_id, None, False, False, json.dumps(texts).encode(), lane=SMALL if query else BULK))


def wait_tokenized(worker: Worker, n: int) -> None:
    deadline = time.monotonic() + 30
    while worker.jobs_tokenized < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.jobs_tokenized == n


def test_a_cpu_window_merges_every_job_received_even_while_it_is_tokenized(worker, bundled_encoder):
    assert worker.window_waits_for_tokenizer  # the bundled encoder runs on the CPU here
    chunks = [real_sentences(64, seed=s) for s in range(4)]
    for job_id, texts in enumerate(chunks, start=1):
        receive(worker, job_id, texts)
    window = worker.next_window()
    assert [job.job_id for job in window] == [1, 2, 3, 4]
    merged = bundled_encoder.encode_tokens(TokenBatch.concat([job.tokens for job in window]))
    np.testing.assert_allclose(merged, bundled_encoder.encode(sum(chunks, [])), atol=1e-5)


def test_a_window_does_not_wait_when_nothing_else_was_received(worker):
    receive(worker, 1, ["one job only"])
    assert [job.job_id for job in worker.next_window()] == [1]
    worker.jobs.put(None)
    assert worker.next_window() is None  # the stop sentinel ends the compute loop



def test_a_query_received_behind_bulk_jobs_is_windowed_first_and_alone(worker):
    """A one-sentence job that reaches a worker busy with bulk jobs neither waits behind them nor
    joins their window (service/lanes.py): its window is itself, the next one theirs."""
    receive(worker, 1, real_sentences(64, seed=1))
    receive(worker, 2, real_sentences(64, seed=2))
    receive(worker, 3, ["one query"], query=True)
    wait_tokenized(worker, 3)
    assert [job.job_id for job in worker.next_window()] == [3]
    assert [job.job_id for job in worker.next_window()] == [1, 2]


class Recorder:
    """Stands in for the compute thread's results socket: the job ids and vectors sent, in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, np.ndarray]] = []

    def send_multipart(self, frames: list, copy: bool = True) -> None:
        self.sent.append((P.read_result_header(frames[0])["job"], np.asarray(frames[1])))


def test_a_query_is_answered_between_the_forward_passes_of_a_bulk_window(worker, bundled_encoder):
    """A query that arrives while a bulk window is computed waits for the pass in progress, not for
    the window: the compute thread answers it between two passes (128 sentences make several CPU
    passes of 1,024 tokens)."""
    receive(worker, 1, real_sentences(64, seed=1))
    receive(worker, 2, real_sentences(64, seed=2))
    wait_tokenized(worker, 2)
    window = worker.next_window()
    receive(worker, 3, ["one query"], query=True)
    wait_tokenized(worker, 3)
    sender = Recorder()
    worker.process_window(window, sender, on_pass=lambda: worker.serve_queries(sender))
    assert [job_id for job_id, _ in sender.sent] == [3, 1, 2]
    np.testing.assert_allclose(sender.sent[0][1], bundled_encoder.encode(["one query"]), atol=1e-5)
    np.testing.assert_allclose(sender.sent[1][1], bundled_encoder.encode(real_sentences(64, seed=1)), atol=1e-5)


def test_a_bulk_window_takes_no_query(worker):
    """A query tokenized while a bulk window is gathered stays out of it (it would wait for the
    whole window there): the next window, or a pass boundary, is its turn."""
    receive(worker, 1, real_sentences(64, seed=1))
    wait_tokenized(worker, 1)
    worker.tokenized.max_defer = 0  # the bulk job goes first now, as one passed over for long would
    receive(worker, 2, ["one query"], query=True)
    receive(worker, 3, real_sentences(64, seed=3))
    wait_tokenized(worker, 3)
    assert [job.job_id for job in worker.next_window()] == [1, 3]
    assert [job.job_id for job in worker.next_window()] == [2]


class LinkRecorder(Recorder):
    """Stands in for the I/O thread's link to the broker: the RESULT messages sent on it."""

    def send_multipart(self, frames: list, copy: bool = True) -> None:
        assert frames[0] == P.RESULT
        super().send_multipart(frames[1:])


def query_job(job_id: int, text: str) -> Job:
    return Job(job_id, None, False, False, json.dumps([text]).encode(), lane=SMALL)


def test_a_busy_cpu_worker_lets_only_queries_skip_its_stages(worker):
    small = Job(1, None, False, False, json.dumps(["part of a bigger request"]).encode(), lane=BULK)
    assert worker.runs_inline(small, idle=True) and not worker.runs_inline(small, idle=False)
    assert worker.runs_inline(query_job(2, "one query"), idle=False)


def test_a_query_on_a_busy_cpu_worker_is_answered_beside_the_bulk_window(worker, bundled_encoder):
    """On a CPU the I/O thread encodes a query itself even while the compute thread is inside a bulk
    window (`Worker.runs_inline`), so the query waits neither for the pass in progress nor for the
    next pass boundary. Queries encoded while the window's other passes run (one engine, concurrent
    calls) get the vectors they get alone, and so does the window."""
    answer_queries_beside_a_held_bulk_window(worker, bundled_encoder, atol=1e-6)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_a_query_on_a_busy_gpu_worker_is_answered_beside_the_bulk_window(tiny_dir):
    """On a GPU the query's passes run on the encoder's high-priority stream, not queued behind the
    passes the compute thread has queued for the bulk window on the default stream; the window's
    passes never replay CUDA graphs, whose fixed input buffers the queries' replays use."""
    from bert import Encoder

    encoder = Encoder.from_dir(str(tiny_dir), device="cuda", dtype="fp32", max_batch_tokens=512)
    assert encoder.describe()["cuda_graphs"] and encoder.query_stream is not None
    worker = Worker(encoder, ServerConfig(), socket=None, context=None, parent_pid=0)
    assert worker.queries_gathered > 1
    thread = threading.Thread(target=worker.tokenize_loop, daemon=True)
    thread.start()
    try:
        answer_queries_beside_a_held_bulk_window(worker, encoder, atol=1e-5)
    finally:
        worker.jobs.put(None)
        thread.join(timeout=30)


@needs_cuda
def test_gpu_urgent_batches_replay_graphs_on_the_query_stream_and_others_run_eagerly(tiny_dir):
    from bert import Encoder

    encoder = Encoder.from_dir(str(tiny_dir), device="cuda", dtype="fp32")
    replays, replay = [], encoder.graphs.replay
    encoder.graphs.replay = lambda *a: (replays.append(torch.cuda.current_stream(encoder.device)), replay(*a))[1]
    batch = encoder.tokenize(real_sentences(3, seed=5))
    urgent = encoder.encode_tokens(batch, urgent=True)
    assert replays == [encoder.query_stream]
    bulk = encoder.encode_tokens(batch, urgent=False)
    assert len(replays) == 1
    np.testing.assert_allclose(urgent, bulk, atol=1e-5)
    np.testing.assert_allclose(encoder.encode(real_sentences(3, seed=5)), urgent, atol=1e-5)  # small: urgent
    assert len(replays) == 2


def answer_queries_beside_a_held_bulk_window(worker: Worker, encoder, atol: float) -> None:
    """Hold the compute thread at the first pass boundary of a two-job bulk window, answer a query
    on the I/O thread meanwhile, then keep answering queries while the window's other passes run;
    every query's vectors are those it gets alone, and the window's are the same sentences' alone."""
    from service.worker import DirectReply

    queries = real_sentences(12, seed=7)
    alone = encoder.encode(queries)
    bulk_texts = real_sentences(64, seed=1) + real_sentences(64, seed=2)
    receive(worker, 1, bulk_texts[:64])
    receive(worker, 2, bulk_texts[64:])
    wait_tokenized(worker, 2)
    window = worker.next_window()
    at_boundary, go_on, passes = threading.Event(), threading.Event(), []

    def first_boundary_held() -> None:
        passes.append(time.monotonic())
        if len(passes) == 1:
            at_boundary.set()
            go_on.wait(30)

    bulk, link = Recorder(), LinkRecorder()
    worker.direct_reply = DirectReply(link)
    compute = threading.Thread(target=worker.process_window, args=(window, bulk, first_boundary_held), daemon=True)
    compute.start()
    try:
        assert at_boundary.wait(30)
        job = query_job(100, queries[0])
        assert worker.runs_inline(job, idle=False)
        worker.run_inline([job])
        assert [job_id for job_id, _ in link.sent] == [100] and bulk.sent == []
    finally:
        go_on.set()
    job_id = 101
    while (compute.is_alive() or job_id < 100 + len(queries)) and job_id < 400:
        worker.run_inline([query_job(job_id, queries[(job_id - 100) % len(queries)])])
        job_id += 1
    compute.join(timeout=60)
    assert not compute.is_alive() and len(passes) > 2  # the window made several passes
    for job_id, vectors in link.sent:
        np.testing.assert_allclose(vectors, alone[(job_id - 100) % len(queries)][None], atol=atol)
    assert [job_id for job_id, _ in bulk.sent] == [1, 2]
    np.testing.assert_allclose(np.concatenate([v for _, v in bulk.sent]), encoder.encode(bulk_texts), atol=1e-5)


def test_queries_the_io_thread_answers_do_not_hide_a_stalled_compute_thread(worker, bundled_encoder):
    """The stall clock watches the stages: a query of several forward passes encoded by the I/O
    thread (8 sentences of 120 tokens in under 2 KB, 976 padded tokens against 512 a pass) does not
    move it, so a compute thread hung in a bulk window is still found while queries are answered."""
    from service.worker import DirectReply

    texts = [" ".join(["a"] * 118)] * 8
    job = Job(1, None, False, False, json.dumps(texts).encode(), lane=SMALL)
    assert worker.runs_inline(job, idle=False) and bundled_encoder.max_batch_tokens < 8 * 120
    worker.direct_reply = DirectReply(link := LinkRecorder())
    worker.progress_at = stalled_since = time.monotonic() - 1000
    worker.run_inline([job])
    assert worker.progress_at == stalled_since
    assert worker.check_stall(in_flight=1, now=time.monotonic(), was_stalled=False)
    np.testing.assert_allclose(link.sent[0][1], bundled_encoder.encode(texts), atol=1e-5)


@pytest.mark.parametrize("gathered,windows", [(1, [1, 1, 1, 1, 1]), (3, [3, 2])])
def test_queries_waiting_on_the_link_are_encoded_together_up_to_the_workers_limit(worker, bundled_encoder,
                                                                                 gathered, windows):
    """The I/O thread's loop over a real link (a Unix socket pair): five queries and a STOP already
    waiting. A GPU worker takes queries that wait into one window, up to `queries_gathered` (one
    CUDA graph replay for several); a CPU worker (1) encodes each as it reads it. Each query gets its
    own vectors either way, and the STOP read among them is kept."""
    import os
    import socket

    import zmq

    from service.link import WorkerSide

    assert worker.queries_gathered == 1  # the bundled encoder runs on the CPU here
    worker.queries_gathered = gathered
    ours, brokers = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.settimeout(60), brokers.settimeout(60)
    broker = WorkerSide(brokers)  # the same framing both ways
    worker.socket = worker.direct_reply.socket = WorkerSide(ours)
    worker.parent_pid = os.getppid()
    sizes = []
    process_window = worker.process_window
    worker.process_window = lambda window, *args, **kwargs: (sizes.append(len(window)),
                                                             process_window(window, *args, **kwargs))
    queries = real_sentences(5, seed=11)
    for job_id, text in enumerate(queries, start=1):
        broker.send_multipart([P.JOB, P.job_header(job_id, None, False, False, is_query=True),
                               json.dumps([text]).encode()])
    broker.send_multipart([P.STOP])
    context = zmq.Context()
    results = context.socket(zmq.PAIR)
    results.bind(f"inproc://gathered-{gathered}")
    try:
        loop = threading.Thread(target=worker.io_loop, args=(results,), daemon=True)
        loop.start()
        loop.join(timeout=60)
        assert not loop.is_alive()  # the STOP was seen: nothing in flight, the loop ended
        answers = {}
        while len(answers) < len(queries):
            frames = broker.recv_multipart()
            if frames[0] == P.HEARTBEAT:
                continue
            assert frames[0] == P.RESULT
            header = P.read_result_header(frames[1])
            answers[header["job"]] = np.frombuffer(frames[2], dtype=np.float32).reshape(header["shape"])
    finally:
        results.close(linger=0)
        context.term()
        ours.close(), brokers.close()
    assert sizes == windows
    np.testing.assert_allclose(np.concatenate([answers[i] for i in range(1, 6)]), bundled_encoder.encode(queries),
                               atol=1e-5)

"""The worker's stages without sockets: a real encoder, the real tokenize thread, the merging policy."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from bert.tokenization import TokenBatch
from helpers import real_sentences
from service.config import ServerConfig
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


def receive(worker: Worker, job_id: int, texts: list[str]) -> None:
    """A JOB from the broker, as the I/O thread hands it on."""
    worker.accept(Job(job_id, None, False, False, json.dumps(texts).encode()))


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

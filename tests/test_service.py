"""End-to-end tests of the service: a real `python app.py` on 127.0.0.1, real ZeroMQ sockets, the
bundled all-MiniLM-L6-v2, and `BertClient`; the expected vectors come from `Encoder` in this process.

Servers (few, because each costs a model load):
- `server`: 2 workers, -max_batch_size 256, shared by most tests (module scope);
- one per special option, each alive only for its class: pooling NONE with tiny jobs, CLS_TOKEN with
  -max_seq_len 8, -output_dtype float16;
- short-lived ones: a server started on a port a client already timed out on, a tiny random BERT
  whose worker is paused, servers sent SIGTERM under load, and one started on a port in use.
Every server is started and stopped through `service/harness.py` (on the CPU, own process group,
stopped by pid); processes are checked through `group_pids`, never looked up by name. Where a test
needs work to be unfinished at some moment, it pauses the worker (SIGSTOP) rather than count on
the machine being slow.
"""
from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from service.client import (BadRequestError, BertClient, BertClientError, BertTimeoutError,
                            ServerError)
from service.corpus import distinct_sentences
from service.harness import ROOT, RunningServer, free_port, group_pids

ATOL = 1e-5          # server vs in-process encoder, float32
TIMEOUT = 240.0      # client timeout for requests that must succeed: a bound against hanging, not a speed
DIM = 384
TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def client_for(server: RunningServer, **kwargs) -> BertClient:
    kwargs.setdefault("timeout", TIMEOUT)
    return BertClient(ip="127.0.0.1", port=server.port, **kwargs)


def assert_close(actual, expected, atol: float = ATOL) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    assert diff <= atol, f"max abs difference {diff:.3g} > {atol:g}"


def leftover_pids(pgid: int) -> list[int]:
    """Processes of group `pgid` still alive once its leader has exited. Checked before the harness's
    SIGKILL to the group could hide anything. multiprocessing's resource tracker (a child of the
    broker) exits on EOF once the broker has exited, so it may outlive it by a few milliseconds on a
    busy machine: hence a bounded wait."""
    deadline = time.monotonic() + 10
    while (left := group_pids(pgid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


@contextmanager
def stopped(pid: int):
    """The process is paused (SIGSTOP) inside the block, so what it holds stays unfinished however
    fast the machine is; resumed (SIGCONT) at the end if it still exists."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def wait_for_jobs_in_flight(server: RunningServer, jobs: int, thread: threading.Thread) -> None:
    """Until the workers hold `jobs` jobs between them (the request has reached them)."""
    with client_for(server, timeout=10) as watcher:
        deadline = time.monotonic() + 60
        while sum(w["jobs_in_flight"] for w in watcher.server_status()["workers"]) < jobs:
            assert time.monotonic() < deadline and thread.is_alive(), "the request was never seen in flight"
            time.sleep(0.02)


def wait_for_log(server: RunningServer, text: str) -> None:
    deadline = time.monotonic() + 30
    while text not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.02)


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return "?"


# ---------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    """1,000 distinct sentences (the shared data set's, or generated); the first `N_REF` have
    in-process reference vectors."""
    return distinct_sentences(1000)


@pytest.fixture(scope="module")
def short_corpus() -> list[str]:
    """5,000 distinct sentences, the shorter half of 10,000 (about half the tokens of a random sample),
    shuffled: enough for ~20 jobs while keeping the test fast on 2 CPU cores."""
    by_text = {" ".join(line.lower().split()): line for line in distinct_sentences(10_000, seed=1)}  # uncased model
    lines = sorted(by_text.values(), key=len)[:5000]
    random.Random(2).shuffle(lines)
    return lines


N_REF = 400


@pytest.fixture(scope="module")
def reference(bundled_encoder, corpus) -> np.ndarray:
    """`Encoder.from_dir().encode()` of corpus[:N_REF], in this process."""
    return bundled_encoder.encode(corpus[:N_REF])


@pytest.fixture(scope="module")
def server():
    with RunningServer(["-num_worker", "2", "-max_batch_size", "256"]) as s:
        yield s


@pytest.fixture
def bc(server):
    with client_for(server) as client:
        yield client


# ---------------------------------------------------------------- vectors


def test_vectors_equal_in_process_encoder(bc, corpus, reference):
    vectors = bc.encode(corpus[:300])
    assert isinstance(vectors, np.ndarray) and vectors.dtype == np.float32 and vectors.shape == (300, DIM)
    assert vectors.flags.writeable
    assert_close(vectors, reference[:300])


def test_output_fmt_list(server, corpus, reference):
    with client_for(server, output_fmt="list") as client:
        vectors = client.encode(corpus[300:360])
    assert isinstance(vectors, list) and len(vectors) == 60
    assert all(isinstance(row, list) and len(row) == DIM for row in vectors)
    assert all(type(x) is float for row in vectors for x in row)
    assert_close(np.array(vectors, dtype=np.float32), reference[300:360])


def test_concurrent_clients_each_get_their_own_vectors(server, corpus, reference):
    n_threads, per_thread, rounds = 16, 6, 3
    barrier = threading.Barrier(n_threads, timeout=30)
    errors: list[str] = []
    checked = [0] * n_threads

    def run(k: int) -> None:
        rows = list(range(k * per_thread, (k + 1) * per_thread))  # this thread's own sentences
        rng = random.Random(k)
        try:
            with client_for(server) as client:
                barrier.wait(timeout=120)  # a thread that failed before it must not hang the rest
                for r in range(rounds):
                    order = rows[:] if r == 0 else rng.sample(rows, rng.randint(1, per_thread))
                    vectors = client.encode([corpus[i] for i in order])
                    diff = float(np.max(np.abs(vectors - reference[order])))
                    if vectors.shape != (len(order), DIM) or diff > ATOL:
                        errors.append(f"thread {k} round {r}: shape {vectors.shape}, max diff {diff:.3g}")
                    checked[k] += 1
        except Exception as e:  # reported below, with the thread it happened in
            errors.append(f"thread {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(n_threads)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    for t in threads:
        t.join(timeout=max(0.1, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "client threads still waiting after 120 s"
    assert not errors, "\n".join(errors)
    assert checked == [rounds] * n_threads


def test_large_request_is_split_over_both_workers_and_reassembled_in_order(bc, short_corpus, bundled_encoder):
    texts = short_corpus
    assert len(texts) == len(set(texts)) == 5000
    before = bc.server_status()
    vectors = bc.encode(texts)  # 5,000 sentences: 20 jobs of <= 256
    assert vectors.shape == (5000, DIM) and vectors.dtype == np.float32
    # The model normalises: every row is a real vector, none missing (a missing part would be zeros).
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert len({row.tobytes() for row in vectors}) == 5000  # no row repeated (e.g. a job sent twice)
    # In order: each job's first and last rows and 3 random ones, against the in-process encoder.
    rng = random.Random(5)
    sample = sorted({i for start in range(0, 5000, 256)
                     for i in (start, min(start + 255, 4999), *rng.sample(range(start, min(start + 256, 5000)), 3))})
    assert_close(vectors[sample], bundled_encoder.encode([texts[i] for i in sample]))
    after = bc.server_status()
    assert after["requests"] - before["requests"] == 1
    assert after["sentences"] - before["sentences"] == 5000
    assert all(w["restarts"] == 0 and w["ready"] for w in after["workers"])
    # Split into 20 jobs, and both workers did some: the broker hands a queue of jobs to every ready
    # worker at once (4 each), whatever the machine's speed.
    jobs = [a["jobs_done"] - b["jobs_done"] for a, b in zip(after["workers"], before["workers"])]
    assert sum(jobs) == 20 and all(n > 0 for n in jobs), jobs


def test_encode_async_yields_in_order_equal_to_encode(bc, corpus, reference):
    sizes = [7, 1, 30, 12, 50, 3]
    starts = np.cumsum([0] + sizes)
    batches = [corpus[starts[k]:starts[k + 1]] for k in range(len(sizes))]
    results = list(bc.encode_async(iter(batches), max_in_flight=2))
    assert [len(r) for r in results] == sizes
    for k, (batch, result) in enumerate(zip(batches, results)):
        assert_close(result, reference[starts[k]:starts[k + 1]])
        assert_close(result, bc.encode(batch), atol=0)


def test_leaving_encode_async_early_keeps_no_replies_and_the_client_stays_in_step(bc, corpus, reference):
    batches = [corpus[k:k + 5] for k in range(0, 40, 5)]
    results = bc.encode_async(batches, max_in_flight=4)
    assert_close(next(results), reference[0:5])
    assert_close(next(results), reference[5:10])  # two more requests are out, perhaps already answered
    results.close()
    assert bc._early == {}  # nothing kept for requests nobody will read
    assert_close(bc.encode(corpus[40:43]), reference[40:43])  # their late replies are not taken for this one
    assert bc._early == {}


def test_calls_inside_encode_async_loops_get_their_own_replies_and_the_loops_theirs(server, corpus, reference):
    """encode(), server_status() and server_config() inside an encode_async loop, and two loops in
    step, on one client: each call waits for its own reply while the loops' replies arrive, and none
    is taken for stale. A timeout short enough that a dropped reply fails the test in seconds."""
    first = [corpus[k:k + 20] for k in range(0, 120, 20)]
    second = [corpus[k:k + 7] for k in range(120, 190, 7)][:6]
    with client_for(server, timeout=60) as client:
        results, queries = [], []
        loops = zip(client.encode_async(first, max_in_flight=4), client.encode_async(second, max_in_flight=3))
        for k, (a, b) in enumerate(loops):
            results.append((a, b))
            queries.append(client.encode([corpus[300 + k]]))
            assert client.server_status()["workers_ready"] == 2
            assert client.server_config()["dim"] == DIM
        for k, (a, b) in enumerate(results):
            assert_close(a, reference[20 * k:20 * k + 20])
            assert_close(b, reference[120 + 7 * k:120 + 7 * k + 7])
            assert_close(queries[k], reference[300 + k:301 + k])
        assert len(results) == 6
        assert client._early == {} and client._outstanding == set()  # nothing held once all is read


def test_show_tokens_and_is_tokenized(bc, bundled_encoder, corpus):
    texts = ["hello world", "Unbelievably, tokenization works!", corpus[0]]
    vectors, tokens = bc.encode(texts, show_tokens=True)
    assert len(tokens) == 3 and all(t[0] == "[CLS]" and t[-1] == "[SEP]" for t in tokens)
    assert tokens[0] == ["[CLS]", "hello", "world", "[SEP]"]
    assert any(piece.startswith("##") for piece in tokens[1])  # WordPiece split a word
    assert tokens == bundled_encoder.tokenizer.tokens(bundled_encoder.tokenize(texts))
    # Sending the same WordPiece tokens (without [CLS]/[SEP]; the server adds them) gives the same vectors.
    pieces = [t[1:-1] for t in tokens]
    tok_vectors, tok_tokens = bc.encode(pieces, is_tokenized=True, show_tokens=True)
    assert tok_tokens == tokens
    assert_close(tok_vectors, vectors)
    assert_close(bc.encode(pieces, is_tokenized=True), bundled_encoder.encode(pieces, is_tokenized=True))


def test_show_progress_returns_the_same_vectors(bc, corpus, reference, capsys):
    vectors = bc.encode(corpus[:150], show_progress=True, batch_size=40)  # 4 requests
    assert_close(vectors, reference[:150])
    assert "150/150" in capsys.readouterr().err  # the progress bar reached the end
    vectors = bc.encode(corpus[:7], show_progress=True)  # fewer than one batch_size: still shown
    assert_close(vectors, reference[:7])
    assert "7/7" in capsys.readouterr().err


def test_numpy_arrays_of_strings_are_encoded_like_lists(bc, corpus, reference):
    assert_close(bc.encode(np.array(corpus[:5])), reference[:5])                 # dtype <U...
    assert_close(bc.encode(np.array(corpus[:5], dtype=object)), reference[:5])  # object array of str
    pieces = [["hello", "big", "world"], ["good", "sunny", "morning"]]
    assert_close(bc.encode(np.array(pieces), is_tokenized=True), bc.encode(pieces, is_tokenized=True), atol=0)
    with pytest.raises(BadRequestError, match="item 0"):
        bc.encode(np.array(pieces))  # rows of tokens without is_tokenized: refused, as the same lists are
    with pytest.raises(BadRequestError, match="numpy array of bytes"):
        bc.encode(np.array([b"abc", b"def"]))
    with pytest.raises(BadRequestError, match="item 1 is int"):
        bc.encode(np.array(["a", 1], dtype=object))


def test_server_config_and_status(bc, server, bundled_dir, bundled_encoder):
    config = bc.server_config()
    assert config["dim"] == DIM == bundled_encoder.dim
    assert Path(config["model_dir"]) == Path(bundled_dir)
    assert config["pooling_modes"] == ["mean"] and config["normalize"] is True
    # Settings as the command line names them, with what the model came to where the user left them open.
    assert config["pooling_strategy"] == "REDUCE_MEAN" and config["pooling_layer"] == [-1]
    assert config["host"] == "127.0.0.1" and config["do_lower_case"] is True and config["dtype"] == "float32"
    assert config["cpu"] is True and config["cpu_threads"] >= 1 and config["device"] == "cpu"
    assert config["max_seq_len"] == bundled_encoder.max_seq_len == 256
    assert config["num_worker"] == 2 and config["max_batch_size"] == 256 and config["port"] == server.port
    assert config["output_dtype"] == "float32"
    assert config["server_pid"] == server.process.pid
    status = bc.server_status()
    assert status["workers_ready"] == 2 and len(status["workers"]) == 2
    assert all(w["ready"] and w["device"] == "cpu" and w["restarts"] == 0 for w in status["workers"])
    worker_pids = {w["pid"] for w in status["workers"]}
    assert len(worker_pids) == 2 and worker_pids <= set(group_pids(server.process.pid))


def test_context_manager_and_double_close(server):
    with client_for(server) as client:
        assert client.encode(["inside the with block"]).shape == (1, DIM)
    with pytest.raises(BertClientError, match="closed"):
        client.encode(["after the with block"])
    client.close()  # a second close is harmless
    other = client_for(server)
    other.close()
    other.close()


def test_bad_input_is_refused_and_the_client_stays_usable(bc):
    with pytest.raises(BadRequestError) as info:
        bc.encode("a single string")
    assert isinstance(info.value, ValueError) and "list" in str(info.value)
    assert bc.encode(["still works"]).shape == (1, DIM)


# ---------------------------------------------------------------- timeouts


def test_dead_port_times_out_then_client_works_once_a_server_listens(bundled_encoder):
    assert issubclass(BertTimeoutError, TimeoutError)
    port = free_port()  # nothing listens here
    client = BertClient(ip="127.0.0.1", port=port, timeout=1)
    try:
        for call in (lambda: client.encode(["hello"]), client.server_status):
            start = time.monotonic()
            with pytest.raises(BertTimeoutError) as info:
                call()
            elapsed = time.monotonic() - start
            assert 0.9 <= elapsed < 20, elapsed  # the 1 s asked for, not the 60 s default (a loaded machine is slow)
            assert isinstance(info.value, TimeoutError) and str(port) in str(info.value)
        # The same client works once a server listens there; the late replies to the two requests
        # above (sent when the connection is made) are dropped, not mistaken for this one's.
        with RunningServer(["-num_worker", "1"], port=port):
            client.timeout = TIMEOUT
            assert_close(client.encode(["the first reply"]), bundled_encoder.encode(["the first reply"]))
            assert client.server_status()["workers_ready"] == 1
    finally:
        client.close()


@pytest.mark.parametrize("timeout, error", [(float("nan"), ValueError), (0, ValueError), (-1, ValueError),
                                            (-float("inf"), ValueError), (-10**400, ValueError),
                                            ("10", TypeError), (True, TypeError)],
                         ids=["nan", "0", "-1", "-inf", "-10**400", "str", "bool"])
def test_a_timeout_no_wait_could_honour_is_refused_when_set(timeout, error):
    with pytest.raises(error, match="timeout must be"):
        BertClient(port=free_port(), timeout=timeout)
    with BertClient(port=free_port(), timeout=5) as client:
        with pytest.raises(error, match="timeout must be"):
            client.timeout = timeout
        assert client.timeout == 5.0


@pytest.mark.parametrize("timeout", [float("inf"), 10**400, 1e300], ids=["inf", "10**400", "1e300"])
def test_an_infinite_or_huge_timeout_waits_and_gets_the_vectors(server, corpus, reference, timeout):
    with client_for(server, timeout=timeout) as client:
        assert client.timeout == (None if timeout != 1e300 else 1e300)  # infinity means None: forever
        assert_close(client.encode(corpus[:3]), reference[:3])
        assert_close(next(client.encode_async([corpus[3:5]])), reference[3:5])
        assert client.server_status()["workers_ready"] == 2


@pytest.mark.parametrize("max_in_flight", [0, -1, 1.5, True])
def test_encode_async_refuses_a_window_that_sends_nothing(bc, max_in_flight):
    with pytest.raises(ValueError, match="max_in_flight"):
        next(bc.encode_async([["a"]], max_in_flight=max_in_flight))


def test_timeout_on_a_busy_server_then_the_next_request_gets_its_own_reply(random_bert, corpus):
    """The worker is paused, so the request cannot be answered in time on any machine; once it runs
    again, the late reply to the first request is dropped and the next request gets its own."""
    from bert import Encoder

    tiny = random_bert("service_tiny", **TINY_BERT)[0]
    encoder = Encoder.from_dir(str(tiny))
    with RunningServer(["-model_dir", str(tiny)]) as server, client_for(server, timeout=0.5) as client:
        worker = client.server_status()["workers"][0]
        with stopped(worker["pid"]):
            with pytest.raises(BertTimeoutError):
                client.encode(corpus[:20])
        client.timeout = TIMEOUT
        assert_close(client.encode(corpus[20:23]), encoder.encode(corpus[20:23]))
        assert_close(client.encode(corpus[23:25]), encoder.encode(corpus[23:25]))
        assert client._early == {}  # the late reply was not kept


# ---------------------------------------------------------------- the example script


def test_client_example_script(server, bundled_encoder):
    from client_example import EXAMPLE_SENTENCES

    base = [sys.executable, str(ROOT / "client_example.py"), "-ip", "127.0.0.1", "-port", str(server.port),
            "-timeout", "60"]
    run = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "dim 384" in run.stdout and "pooling mean" in run.stdout
    rows = [line for line in run.stdout.splitlines() if re.match(r"\[\d\]\s", line)]
    assert len(rows) == 3
    printed = np.array([[float(x) for x in row.split()[1:4]] for row in rows])
    ref = bundled_encoder.encode(EXAMPLE_SENTENCES)
    np.testing.assert_allclose(printed, ref @ ref.T, atol=1.5e-3)  # 3 decimals
    assert all(row.endswith(sentence) for row, sentence in zip(rows, EXAMPLE_SENTENCES))
    assert printed[0, 1] > printed[0, 2]  # the cat and the kitten are closer than the cat and the market

    speed = subprocess.run(base + ["-num_sentences", "120", "-batch_size", "32", "-num_repeat", "2"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert speed.returncode == 0, speed.stderr
    rounds = re.findall(r"round \d/2: 120 sentences in [\d.]+ s: ([\d,.]+) sentences/s", speed.stdout)
    assert len(rounds) == 2 and all(float(r.replace(",", "")) > 0 for r in rounds), speed.stdout
    assert re.search(r"best: [\d,.]+ sentences/s", speed.stdout)

    dead = subprocess.run(base[:5] + [str(free_port()), "-timeout", "1"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert dead.returncode == 1 and "python app.py" in dead.stderr


# ---------------------------------------------------------------- servers with other options


class TestPoolingNoneAcrossJobs:
    """Per-token vectors, with requests split into jobs of 4 whose widths differ: the client pads."""

    @pytest.fixture(scope="class")
    def none_server(self):
        with RunningServer(["-pooling_strategy", "NONE", "-max_batch_size", "4"]) as s:
            yield s

    @pytest.fixture(scope="class")
    def none_encoder(self):
        from bert import Encoder

        return Encoder.from_dir(pooling_strategy="NONE")

    TEXTS = ["a", "short one", "hi", "ok then",  # job 1: short
             "a somewhat longer sentence with quite a few more words in it than the others",  # job 2: long
             "b", "c d", "e",
             "a medium sentence of some words", "f"]  # job 3: medium

    def test_per_token_vectors_zero_padded_equal_in_process(self, none_server, none_encoder):
        with client_for(none_server) as client:
            vectors, tokens = client.encode(self.TEXTS, show_tokens=True)
            assert client.server_config()["pooling_modes"] == ["none"]
        lengths = [len(t) for t in tokens]
        job_widths = [max(lengths[i:i + 4]) for i in range(0, len(lengths), 4)]
        assert len(set(job_widths)) == 3, job_widths  # the parts really had different widths
        assert vectors.ndim == 3 and vectors.shape == (len(self.TEXTS), max(lengths), DIM)
        for i, n in enumerate(lengths):
            assert not vectors[i, n:].any(), f"row {i}: padding after its {n} tokens is not zero"
            assert np.all(np.linalg.norm(vectors[i, :n], axis=1) > 0)
        assert_close(vectors, none_encoder.encode(self.TEXTS))

    def test_client_pads_chunks_of_show_progress(self, none_server, none_encoder):
        with client_for(none_server) as client:
            vectors = client.encode(self.TEXTS, show_progress=True, batch_size=3)
        assert_close(vectors, none_encoder.encode(self.TEXTS))


class TestClsTokenWithShortMaxSeqLen:
    @pytest.fixture(scope="class")
    def cls_server(self):
        with RunningServer(["-pooling_strategy", "CLS_TOKEN", "-max_seq_len", "8"]) as s:
            yield s

    @pytest.fixture(scope="class")
    def cls_encoder(self):
        from bert import Encoder

        return Encoder.from_dir(pooling_strategy="CLS_TOKEN", max_seq_len=8)

    def test_cls_vectors_equal_in_process(self, cls_server, cls_encoder, corpus):
        texts = corpus[:40] + ["hi"]
        with client_for(cls_server) as client:
            vectors = client.encode(texts)
            config = client.server_config()
        assert config["pooling_modes"] == ["cls"] and config["max_seq_len"] == 8 and config["dim"] == DIM
        assert_close(vectors, cls_encoder.encode(texts))

    def test_tokens_show_truncation(self, cls_server, cls_encoder):
        long = "this sentence has many more than eight word pieces once it is tokenized by the server"
        with client_for(cls_server) as client:
            vectors, tokens = client.encode([long, "hi"], show_tokens=True)
        assert tokens[0] == ["[CLS]", "this", "sentence", "has", "many", "more", "than", "[SEP]"]
        assert tokens[1] == ["[CLS]", "hi", "[SEP]"]
        # Truncated means only those 8 tokens count: the same vector as the 6 words alone.
        assert_close(vectors, cls_encoder.encode(["this sentence has many more than", "hi"]))


class TestFloat16Output:
    @pytest.fixture(scope="class")
    def fp16_server(self):
        with RunningServer(["-output_dtype", "float16"]) as s:
            yield s

    def test_float16_on_the_wire_float32_to_the_caller(self, fp16_server, corpus, reference):
        with client_for(fp16_server) as client:
            vectors = client.encode(corpus[:100])
            assert client.server_config()["output_dtype"] == "float16"
        assert vectors.dtype == np.float32 and vectors.shape == (100, DIM)
        # Every value is a float16 value (it travelled as one), within float16 rounding of the reference.
        np.testing.assert_array_equal(vectors.astype(np.float16).astype(np.float32), vectors)
        np.testing.assert_allclose(vectors, reference[:100], rtol=2 ** -10, atol=1e-6)
        assert np.max(np.abs(vectors - reference[:100])) > 0  # really rounded, not the float32 values


# ---------------------------------------------------------------- shutdown and the command line


@pytest.mark.parametrize("case", ["mostly_queued", "all_in_flight"])
def test_sigterm_during_a_large_request(case, corpus, reference):
    """SIGTERM: jobs already on a worker finish (within a grace period) and a request made only of
    them is answered; a request with jobs still queued gets the server's 'shut down' error. Never a
    hang; the server exits 0 leaving no process of its group behind."""
    # mostly_queued: 1,000 sentences in 63 jobs of 16, a worker holds a few (its READY capacity);
    # all_in_flight: as many jobs of 64 as it holds. The worker is paused until the server has the
    # signal, so what is queued and what is on the worker then does not depend on the machine's speed.
    batch_size = 16 if case == "mostly_queued" else 64
    with RunningServer(["-num_worker", "1", "-max_batch_size", str(batch_size)]) as server:
        outcome: dict = {}

        def request() -> None:
            try:
                with client_for(server) as client:
                    outcome["value"] = client.encode(corpus[:n])
            except Exception as e:
                outcome["value"] = e

        pid = server.process.pid
        names = {p: process_name(p) for p in group_pids(pid)}  # broker, worker, multiprocessing's tracker
        with client_for(server) as watcher:
            worker = watcher.server_status()["workers"][0]
        capacity = worker["capacity"]
        n = 1000 if case == "mostly_queued" else capacity * batch_size
        thread = threading.Thread(target=request, daemon=True)
        with stopped(worker["pid"]):
            thread.start()
            wait_for_jobs_in_flight(server, capacity, thread)
            server.process.send_signal(signal.SIGTERM)
            wait_for_log(server, "shutting down")
        code = server.process.wait(timeout=60)
        left = [(p, names.get(p) or process_name(p)) for p in leftover_pids(pid)]
        thread.join(timeout=30)
        assert not thread.is_alive(), "the client is still waiting after the server exited"
        log = server.log()
    result = outcome["value"]
    assert len(names) >= 2, names
    assert code == 0, log
    assert left == [], f"processes of the server's group left after it exited: {left}\n{log}"
    assert "SIGTERM received" in log and "stopped" in log
    if case == "all_in_flight":
        assert isinstance(result, np.ndarray), f"{result!r}\n{log}"
        assert_close(result, reference[:n])
    else:
        assert isinstance(result, ServerError) and result.code == "unavailable" and "shut down" in str(result), \
            f"expected the server's 'shut down' error, got {result!r}"


def test_request_during_the_shutdown_grace_gets_a_shutting_down_error(corpus):
    with RunningServer(["-num_worker", "1", "-max_batch_size", "256"]) as server:
        outcome: dict = {}

        def request() -> None:  # 2 jobs, both on the worker: the grace period lasts while they compute
            try:
                with client_for(server) as client:
                    outcome["value"] = client.encode(corpus[:512])
            except Exception as e:
                outcome["value"] = e

        with client_for(server) as watcher:
            worker = watcher.server_status()["workers"][0]["pid"]
        thread = threading.Thread(target=request, daemon=True)
        with stopped(worker):  # the first request cannot finish before the late one is sent
            thread.start()
            wait_for_jobs_in_flight(server, 2, thread)
            server.process.send_signal(signal.SIGTERM)
            wait_for_log(server, "shutting down")
            with client_for(server, timeout=30) as late:
                try:
                    late.server_status()
                    late_result = None
                except BertClientError as e:
                    late_result = e
        assert server.process.wait(timeout=60) == 0
        thread.join(timeout=30)
    assert isinstance(outcome.get("value"), np.ndarray)  # the in-flight request was still answered
    assert isinstance(late_result, ServerError) and late_result.code == "unavailable", \
        f"late request during shutdown: {late_result!r}"


def test_port_in_use_exits_1_before_a_worker_starts_and_the_running_server_is_unharmed(server):
    with RunningServer(["-num_worker", "1", "-verbose"], port=server.port, wait_ready=False) as busy:
        code = busy.process.wait(timeout=60)
        left = [(p, process_name(p)) for p in leftover_pids(busy.process.pid)]
        log = busy.log()
    assert code == 1, log
    assert f"cannot listen on tcp://127.0.0.1:{server.port}" in log and "ready on tcp://" not in log
    # The port is bound before any worker is started, so a large model is never loaded in vain.
    assert "started worker" not in log and "worker 0 ready" not in log, log
    assert left == [], f"the failed server left processes behind: {left}"
    with client_for(server) as client:
        assert client.server_status()["workers_ready"] == 2
        assert client.encode(["still here"]).shape == (1, DIM)


def test_bad_model_dir_exits_1_without_opening_the_port():
    port = free_port()
    missing = "/nonexistent/model-folder-xyz"
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "-cpu", "-host", "127.0.0.1", "-port", str(port),
                             "-model_dir", missing], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    connected = 0
    try:
        while proc.poll() is None and time.monotonic() - start < 30:  # probe the port while it runs
            with socket.socket() as s:
                s.settimeout(0.2)
                connected += s.connect_ex(("127.0.0.1", port)) == 0
            time.sleep(0.01)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 1, out
    assert missing in out and "ready on tcp://" not in out
    assert connected == 0, "the port accepted a connection"


def test_help_lists_every_flag_with_a_description():
    from app import build_parser

    run = subprocess.run([sys.executable, str(ROOT / "app.py"), "-h"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and run.stdout.startswith("usage: app.py")
    for action in build_parser()._actions:
        assert action.option_strings[0] in run.stdout and action.help, action.dest
    for choice in ("CLS_TOKEN", "REDUCE_MEAN", "float16"):
        assert choice in run.stdout

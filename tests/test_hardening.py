"""Hardening: a real `python app.py` on 127.0.0.1 against hostile bytes, bad calls, dying and hanging
workers, overload, restarts, unauthenticated clients and signals.

Servers (each started through `service/harness.py`: own process group, stopped by pid):
- `tiny_server`: a tiny random BERT, -max_client_batch_size 100, -max_request_bytes 2 MB; the target of
  the hostile bytes and bad calls (the model does not matter there, start-up time does);
- `pool_server`: the bundled model, 2 workers, for workers that die or hang mid-request;
- `overload_server`: the bundled model, 1 worker, -max_queue 300;
- short-lived ones for memory, restart, authentication and signals.
Expected vectors come from `Encoder` in this process, on the same model folder.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from helpers import raw_dealer, real_sentences
from service import protocol as P
from service.client import (ERR_BAD_REQUEST, BadRequestError, BertClient, BertTimeoutError,
                            ServerBusyError, ServerError)
from service.harness import ROOT, RunningServer, free_port, group_pids, rss_kb, wait_for

ATOL = 1e-5
MAX_SENTENCES = 100
MAX_BYTES = 2_000_000    # over 1 MB, so that 1 MB of garbage still gets a reply
BAD_REQUEST_LOG = "bad request from"


# ---------------------------------------------------------------- helpers


def status(server: RunningServer) -> dict:
    with BertClient(port=server.port, timeout=15) as client:
        return client.server_status()


def wait_for_pool(server: RunningServer, workers: int, timeout: float = 90) -> dict:
    return wait_for(lambda: (s := status(server))["workers_ready"] == workers and s, timeout,
                    f"{workers} ready workers\n{server.log()[-3000:]}", interval=0.25)


def restarts(state: dict) -> list[int]:
    return [w["restarts"] for w in state["workers"]]


def exchange(dealer: zmq.Socket, frames: list[bytes], timeout: float = 15) -> list[bytes]:
    dealer.send_multipart(frames)
    assert dealer.poll(int(timeout * 1000)), "no reply from the server"
    return dealer.recv_multipart()


def header(drop: tuple[str, ...] = (), **fields) -> bytes:
    """An encode request header with some fields changed or dropped."""
    value = {"v": 1, "id": 7, "cmd": "encode", "timeout": None, "is_tokenized": False, "show_tokens": False}
    value.update(fields)
    return json.dumps({k: v for k, v in value.items() if k not in drop}).encode()


def assert_serving(server: RunningServer, encoder, workers: int = 1) -> None:
    """The server answers a normal request correctly, and no worker was restarted."""
    with BertClient(port=server.port, timeout=30) as client:
        np.testing.assert_allclose(client.encode(["still serving", "yes"]), encoder.encode(["still serving", "yes"]),
                                   atol=ATOL)
        state = client.server_status()
    assert server.process.poll() is None
    assert restarts(state) == [0] * workers and state["workers_ready"] == workers, state


def assert_rows_match(vectors: np.ndarray, texts: list[str], reference: dict[str, np.ndarray]) -> None:
    assert vectors.shape == (len(texts), len(next(iter(reference.values()))))
    np.testing.assert_allclose(vectors, np.stack([reference[t] for t in texts]), atol=ATOL)


class CreatesFile:
    """A pickle that, when unpickled, creates the file `path` (what `recv_pyobj` servers would run)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


# ---------------------------------------------------------------- servers and references


@pytest.fixture(scope="module")
def tiny_server(tiny_dir):
    with RunningServer(["-model_dir", str(tiny_dir), "-max_client_batch_size", str(MAX_SENTENCES),
                        "-max_request_bytes", str(MAX_BYTES)]) as server:
        yield server


@pytest.fixture(scope="module")
def pool_server():
    with RunningServer(["-num_worker", "2"]) as server:
        yield server


# ---------------------------------------------------------------- hostile bytes

_rng = random.Random(1234)
TEXTS = b'["hello", "world"]'
HOSTILE = {  # name: (frames, what the error message must say, id the reply must carry)
    "random bytes": ([_rng.randbytes(512)], "header frame is not UTF-8 JSON", None),
    "one empty frame": ([b""], "header frame is not UTF-8 JSON", None),
    "three empty frames": ([b"", b"", b""], "header frame is not UTF-8 JSON", None),
    "empty texts frame": ([header(), b""], "texts frame is not UTF-8 JSON", 7),
    "50 frames": ([header()] + [TEXTS] * 49, "takes 2 frames (header, texts), got 50", 7),
    "50 garbage frames": ([_rng.randbytes(16) for _ in range(50)], "header frame is not UTF-8 JSON", None),
    "1 MB of garbage": ([_rng.randbytes(1 << 20)], "header frame of 1048576 bytes is over the limit of 8192", None),
    "1 MB of garbage texts": ([header(), _rng.randbytes(1 << 20)], "texts frame is not UTF-8 JSON", 7),
    "header is a list": ([b'[1, "encode"]', TEXTS], "header frame must be a JSON object, got list", None),
    "header is a string": ([b'"encode"', TEXTS], "header frame must be a JSON object, got str", None),
    "header is null": ([b"null", TEXTS], "header frame must be a JSON object, got NoneType", None),
    "header is not UTF-8": ([b'{"v": 1, "id": 7, "cmd": "enc\xffode"}', TEXTS], "header frame is not UTF-8", None),
    "no version": ([header(drop=("v",)), TEXTS], "protocol version None is not supported", 7),
    "version 2": ([header(v=2), TEXTS], "protocol version 2 is not supported", 7),
    "no id": ([header(drop=("id",)), TEXTS], "'id' must be an integer", None),
    "id as string": ([header(id="7"), TEXTS], "'id' must be an integer", None),
    "id as bool": ([header(id=True), TEXTS], "'id' must be an integer", None),
    "id as float": ([header(id=7.5), TEXTS], "'id' must be an integer", None),
    "no cmd": ([header(drop=("cmd",)), TEXTS], "unknown command None", 7),
    "unknown cmd": ([header(cmd="shutdown"), TEXTS], "unknown command 'shutdown'", 7),
    "negative timeout": ([header(timeout=-1), TEXTS], "'timeout' must be a positive number", 7),
    "zero timeout": ([header(timeout=0), TEXTS], "'timeout' must be a positive number", 7),
    "timeout as string": ([header(timeout="10"), TEXTS], "'timeout' must be a positive number", 7),
    "NaN timeout": ([header(timeout=float("nan")), TEXTS], "'timeout' must be a positive number", 7),
    "10**400 timeout": ([header(timeout=10**400), TEXTS], "'timeout' must be a positive number", 7),
    "is_tokenized as string": ([header(is_tokenized="yes"), TEXTS], "'is_tokenized' must be true or false", 7),
    "encode without texts": ([header()], "takes 2 frames (header, texts), got 1", 7),
    "status with texts": ([header(cmd="status"), TEXTS], "'status' takes 1 frame, got 2", 7),
    "texts is a dict": ([header(), b'{"texts": ["a"]}'], "takes a list of strings, got dict", 7),
    "texts is a string": ([header(), b'"hello"'], "not a single str", 7),
    "texts is null": ([header(), b"null"], "takes a list of strings, got NoneType", 7),
    "texts is empty": ([header(), b"[]"], "empty list", 7),
    "texts hold ints": ([header(), b'["a", 1, 2]'], "item 1 is int", 7),
    "texts hold None": ([header(), b'["a", null]'], "item 1 is NoneType", 7),
    "texts hold nested lists": ([header(), b'["a", ["b", "c", "d"]]'], "did you mean is_tokenized=True", 7),
    "tokens hold ints": ([header(is_tokenized=True), b'[["a", 1]]'], "list of token strings", 7),
    "texts as latin-1 bytes": ([header(), '["café", "naïve"]'.encode("latin-1")], "texts frame is not UTF-8 JSON", 7),
    "texts not UTF-8": ([header(), b'["\xff\xfe\xfd"]'], "texts frame is not UTF-8 JSON", 7),
    "deeply nested header": ([b"[" * 100_000, TEXTS], "header frame of 100000 bytes is over the limit", None),
    "nested header under the size limit": ([b"[" * 8000, TEXTS], "header frame is not UTF-8 JSON", None),
    "deeply nested texts": ([header(), b"[" * 100_000], "texts frame is not UTF-8 JSON", 7),
    "lone surrogate": ([header(), b'["ok", "\\ud800"]'], "item 1 is not valid Unicode", 7),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_message_gets_bad_request_counted_once_and_the_server_serves_on(name, tiny_server, tiny_encoder):
    frames, message, request_id = HOSTILE[name]
    before = status(tiny_server)
    with raw_dealer(tiny_server.port) as dealer:
        reply = exchange(dealer, frames)
    answer = json.loads(reply[0])
    assert len(reply) == 1 and answer["ok"] is False and answer["error"] == ERR_BAD_REQUEST, answer
    assert message in answer["message"] and answer["id"] == request_id, answer
    # Counted once per request, not per frame; logged at most a line per 10 s (the first one is).
    assert status(tiny_server)["bad_requests"] == before["bad_requests"] + 1
    assert BAD_REQUEST_LOG in tiny_server.log()
    assert_serving(tiny_server, tiny_encoder)


def test_a_pickle_is_never_unpickled(tmp_path, tiny_server, tiny_encoder):
    probe, marker = tmp_path / "probe", tmp_path / "marker"
    pickle.loads(pickle.dumps(CreatesFile(probe))).close()
    assert probe.exists(), "the payload is live: unpickling it creates a file"
    payload = pickle.dumps(CreatesFile(marker))
    with raw_dealer(tiny_server.port) as dealer:
        for frames in ([payload], [header(), payload], [payload, TEXTS]):
            answer = json.loads(exchange(dealer, frames)[0])
            assert answer["ok"] is False and answer["error"] == ERR_BAD_REQUEST, answer
            assert "not UTF-8 JSON" in answer["message"]
    assert_serving(tiny_server, tiny_encoder)
    assert not marker.exists()


def test_a_valid_text_with_latin1_characters_is_encoded(tiny_server, tiny_encoder):
    """The control for the latin-1 case above: the same text sent as UTF-8 is fine."""
    texts = ["café", "naïve", "ÿþ\x80"]
    with raw_dealer(tiny_server.port) as dealer:
        reply = exchange(dealer, [header(), json.dumps(texts, ensure_ascii=False).encode("utf-8")])
    answer = json.loads(reply[0])
    assert answer["ok"] is True and answer["shapes"] == [[3, 32]], answer
    np.testing.assert_allclose(np.frombuffer(reply[1], np.float32).reshape(3, 32), tiny_encoder.encode(texts),
                               atol=ATOL)


def test_non_zmtp_garbage_on_the_port_does_not_disturb_the_server(tiny_server, tiny_encoder):
    """libzmq still speaks ZMTP 1.0 to a peer whose first byte is not 0xff, so some garbage is read as
    length-prefixed frames: those become messages, and each must be refused like any bad request."""
    rng = random.Random(7)
    before, logged = status(tiny_server), tiny_server.log().count(BAD_REQUEST_LOG)
    payloads = [rng.randbytes(64 * 1024), b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", b"\x00" * 10_000,
                b"\xff" + b"\x00" * 8 + b"\x7f" + rng.randbytes(4096)]  # a ZMTP signature, then garbage
    for payload in payloads:
        with socket.create_connection(("127.0.0.1", tiny_server.port), timeout=5) as conn:
            try:
                conn.sendall(payload)
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(4096):  # the server may answer with its greeting, then hangs up
                    pass
            except OSError:
                pass  # the server hung up while we were still writing: fine
    # A peer that connects and then says nothing must not hold up anyone else either.
    with socket.create_connection(("127.0.0.1", tiny_server.port), timeout=5):
        assert_serving(tiny_server, tiny_encoder)
    after = status(tiny_server)
    # Each line logged is a request counted (lines are rate-limited, so there may be fewer).
    assert after["bad_requests"] - before["bad_requests"] >= tiny_server.log().count(BAD_REQUEST_LOG) - logged
    assert after["errors"] == before["errors"] and after["requests"] == before["requests"] + 1, (before, after)


def test_a_message_over_the_hard_size_cap_drops_the_connection_not_the_server(tiny_server, tiny_encoder):
    """Above 4 x -max_request_bytes (ZMQ_MAXMSGSIZE) ZeroMQ drops the connection before buffering it all:
    no reply is possible, but the server goes on and the same socket, reconnected, is answered."""
    with raw_dealer(tiny_server.port) as dealer:
        dealer.send_multipart([header(), b"x" * (4 * MAX_BYTES + 1)])
        assert not dealer.poll(2000)

        def ask_status() -> dict | None:
            dealer.send_multipart([header(cmd="status", id=8)])
            return json.loads(dealer.recv_multipart()[0]) if dealer.poll(1000) else None

        answer = wait_for(ask_status, 15, "a reply after the reconnect", interval=0)
        assert answer["ok"] is True and answer["id"] == 8
    assert_serving(tiny_server, tiny_encoder)


# ---------------------------------------------------------------- bad calls through the client

BAD_CALLS = {  # name: (texts, encode kwargs, what the message must say, refused by the server itself)
    "empty list": ([], {}, "empty list", False),
    "a string": ("a string", {}, "not a single str; wrap it in a list", False),
    "bytes": (b"some bytes", {}, "not a single bytes", False),
    "a list of bytes": ([b"abc"], {}, "item 0 is bytes", False),
    "ints and None": ([1, None], {}, "item 0 is int", False),
    "None inside": (["a", None], {}, "item 1 is NoneType", False),
    "nested lists": ([["a", "b", "c"]], {}, "did you mean is_tokenized=True", False),  # 2 would be a pair
    "ints as tokens": ([[1, 2]], {"is_tokenized": True}, "list of token strings", False),
    "lone surrogate": (["ok", "\ud800"], {}, "item 1 is not valid Unicode", False),
    "over -max_client_batch_size": (["s"] * (MAX_SENTENCES + 1), {},
                                    f"more than {MAX_SENTENCES} sentences is over the server's limit of {MAX_SENTENCES}",
                                    True),
    "over -max_request_bytes": (["x" * 25_000] * 90, {}, f"over the server's limit of {MAX_BYTES} bytes", True),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_call_raises_bad_request_and_the_client_stays_usable(name, tiny_server, tiny_encoder):
    texts, kwargs, message, by_server = BAD_CALLS[name]
    refused = status(tiny_server)["bad_requests"]
    with BertClient(port=tiny_server.port, timeout=30) as client:
        with pytest.raises(BadRequestError, match=re.escape(message)):
            client.encode(texts, **kwargs)
        np.testing.assert_allclose(client.encode(["next"]), tiny_encoder.encode(["next"]), atol=ATOL)
    # Client-side checks refuse before sending; the limits only the server knows come back from it.
    assert status(tiny_server)["bad_requests"] == refused + by_server
    assert_serving(tiny_server, tiny_encoder)


# ---------------------------------------------------------------- workers that die or hang


class ConcurrentClients:
    """`threads` clients sending `batches` between them, started at once; `join()` returns
    {batch index: vectors, or the exception its encode raised}."""

    def __init__(self, port: int, batches: list[list[str]], threads: int, timeout: float = 120) -> None:
        self.port, self.batches, self.timeout = port, batches, timeout
        self.results: dict[int, object] = {}
        self.threads = [threading.Thread(target=self.run, args=(t, threads), daemon=True) for t in range(threads)]
        for t in self.threads:
            t.start()

    def run(self, first: int, step: int) -> None:
        with BertClient(port=self.port, timeout=self.timeout) as client:
            for i in range(first, len(self.batches), step):
                try:
                    self.results[i] = client.encode(self.batches[i])
                except Exception as e:  # recorded, and asserted on by the test
                    self.results[i] = e

    def join(self, timeout: float) -> dict[int, object]:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))
            assert not t.is_alive(), "a client thread did not finish"
        return self.results


def test_sigkill_of_a_busy_worker_loses_no_request(pool_server, bundled_encoder):
    per_request = 5
    texts = real_sentences(80 * per_request, seed=21)
    batches = [texts[i:i + per_request] for i in range(0, len(texts), per_request)]  # 8 threads x 10, all different
    before = wait_for_pool(pool_server, 2)
    clients = ConcurrentClients(pool_server.port, batches, threads=8)
    victim = wait_for(lambda: next((w for w in status(pool_server)["workers"] if w["jobs_in_flight"]), None),
                      30, "a worker holding jobs", interval=0.01)
    os.kill(victim["pid"], signal.SIGKILL)
    results = clients.join(120)
    reference = bundled_encoder.encode(texts)
    errors = {i: r for i, r in results.items() if isinstance(r, Exception)}
    assert not errors and len(results) == 80, errors
    for i in range(len(batches)):
        np.testing.assert_allclose(results[i], reference[i * per_request:(i + 1) * per_request], atol=ATOL)
    index = victim["index"]
    after = wait_for(lambda: (s := wait_for_pool(pool_server, 2))["workers"][index]["restarts"]
                     == before["workers"][index]["restarts"] + 1 and s, 60, "the restart to be counted")
    assert restarts(after)[1 - index] == restarts(before)[1 - index], after
    assert after["workers"][index]["pid"] != victim["pid"]
    assert re.search(rf"worker {index} \(pid {victim['pid']}\) exited with code -9", pool_server.log())


def test_a_stopped_worker_is_found_by_heartbeat_killed_and_its_jobs_resent(pool_server, bundled_encoder):
    before = wait_for_pool(pool_server, 2)
    hung = before["workers"][0]  # the least-loaded choice breaks ties by index: it gets the first jobs
    texts = real_sentences(96, seed=22)
    batches = [texts[i:i + 8] for i in range(0, 96, 8)]
    os.kill(hung["pid"], signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        clients = ConcurrentClients(pool_server.port, batches, threads=4)
        wait_for(lambda: status(pool_server)["workers"][0]["jobs_in_flight"], 5, "jobs on the stopped worker",
                 interval=0.02)
        results = clients.join(120)
        waited = time.monotonic() - stopped_at
    finally:
        if hung["pid"] in group_pids(pool_server.process.pid):  # the broker did not kill it: let it go on
            os.kill(hung["pid"], signal.SIGCONT)
    errors = {i: r for i, r in results.items() if isinstance(r, Exception)}
    assert not errors and len(results) == len(batches), errors
    np.testing.assert_allclose(np.concatenate([results[i] for i in range(len(batches))]),
                               bundled_encoder.encode(texts), atol=ATOL)
    silence = P.HEARTBEAT_INTERVAL * P.HEARTBEAT_LIVENESS
    assert waited >= silence - P.HEARTBEAT_INTERVAL, "the stuck jobs came back only after the heartbeat expiry"
    found = re.search(rf"worker 0 \(pid {hung['pid']}\) sent no heartbeat for ([\d.]+) s; (\d+) jobs go back",
                      pool_server.log())
    assert found and float(found[1]) >= silence and int(found[2]) >= 1, pool_server.log()[-3000:]
    after = wait_for(lambda: (s := wait_for_pool(pool_server, 2))["workers"][0]["restarts"]
                     == hung["restarts"] + 1 and s, 60, "the restart to be counted")
    assert after["workers"][0]["pid"] != hung["pid"] and hung["pid"] not in group_pids(pool_server.process.pid)


def test_a_request_that_kills_every_worker_it_reaches_is_failed_not_retried_forever(pool_server, bundled_encoder):
    """Kill whichever worker holds the request, each time it is dispatched: after MAX_JOB_ATTEMPTS
    deaths the client gets a ServerError, and the server serves on."""
    wait_for_pool(pool_server, 2)
    long_texts = [" ".join(real_sentences(4, seed=100 + i)) for i in range(256)]  # one job of 256
    outcome: dict[str, object] = {}

    def send() -> None:
        with BertClient(port=pool_server.port, timeout=180) as client:
            try:
                outcome["vectors"] = client.encode(long_texts)
            except Exception as e:  # asserted on below
                outcome["error"] = e

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    killed: list[int] = []
    deadline = time.monotonic() + 150
    with BertClient(port=pool_server.port, timeout=15) as watcher:
        while sender.is_alive() and len(killed) < P.MAX_JOB_ATTEMPTS and time.monotonic() < deadline:
            for worker in watcher.server_status()["workers"]:
                if worker["jobs_in_flight"] and worker["pid"] not in killed:
                    os.kill(worker["pid"], signal.SIGKILL)
                    killed.append(worker["pid"])
            time.sleep(0.01)
    sender.join(60)
    assert not sender.is_alive() and len(killed) == P.MAX_JOB_ATTEMPTS, (killed, outcome)
    error = outcome.get("error")
    assert isinstance(error, ServerError) and not isinstance(error, ServerBusyError), outcome
    assert error.code == "server_error" and "it is not retried again" in str(error)
    assert f"on {P.MAX_JOB_ATTEMPTS} workers that died" in str(error)
    state = wait_for_pool(pool_server, 2)
    assert state["queued_sentences"] == 0 and all(w["jobs_in_flight"] == 0 for w in state["workers"])
    with BertClient(port=pool_server.port, timeout=60) as client:
        np.testing.assert_allclose(client.encode(long_texts[:3]), bundled_encoder.encode(long_texts[:3]), atol=ATOL)


# ---------------------------------------------------------------- overload


@pytest.fixture(scope="module")
def overload_server():
    with RunningServer(["-num_worker", "1", "-max_queue", "300"]) as server:
        yield server


def test_overload_is_refused_at_once_and_the_rest_is_served(overload_server, bundled_encoder):
    n_clients, size = 16, 150
    texts = real_sentences(n_clients * size, seed=31)
    batches = [texts[i * size:(i + 1) * size] for i in range(n_clients)]
    barrier = threading.Barrier(n_clients, timeout=30)
    outcomes: list = [None] * n_clients

    def run(i: int) -> None:
        with BertClient(port=overload_server.port, timeout=120) as client:
            client.server_status()  # connected before the race starts
            barrier.wait(timeout=120)  # a thread that failed before it must not hang the rest
            start = time.monotonic()
            try:
                outcomes[i] = ("ok", client.encode(batches[i]), time.monotonic() - start)
            except ServerBusyError as e:
                outcomes[i] = ("busy", e, time.monotonic() - start)
            except Exception as e:  # asserted on below
                outcomes[i] = ("error", e, time.monotonic() - start)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
        assert not t.is_alive()
    kinds = [o[0] for o in outcomes]
    assert "error" not in kinds, outcomes
    busy = [o for o in outcomes if o[0] == "busy"]
    served = [(i, o) for i, o in enumerate(outcomes) if o[0] == "ok"]
    assert busy and served, kinds
    for _, error, elapsed in busy:
        assert "server busy" in str(error) and elapsed < 60, (str(error), elapsed)  # at once, not the 120 s timeout
    rows = [0, 37, 74, 111, size - 1]  # spot checks keep the in-process reference cheap
    for i, (_, vectors, _) in served:
        assert vectors.shape == (size, 384)
        np.testing.assert_allclose(vectors[rows], bundled_encoder.encode([batches[i][r] for r in rows]), atol=ATOL)
    state = status(overload_server)
    assert state["busy"] >= len(busy) and state["queued_sentences"] == 0 and restarts(state) == [0], state
    with BertClient(port=overload_server.port, timeout=60) as client:
        np.testing.assert_allclose(client.encode(texts[:4]), bundled_encoder.encode(texts[:4]), atol=ATOL)


def test_memory_stays_flat_under_many_small_requests(tiny_dir, tiny_encoder):
    n_clients, warmup, rounds = 64, 20, 100
    pool = real_sentences(400, seed=41)
    reference = dict(zip(pool, tiny_encoder.encode(pool)))
    failures: list = []

    def run(client: BertClient, seed: int, n: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(n):
                batch = rng.sample(pool, rng.randint(1, 8))
                assert_rows_match(client.encode(batch), batch, reference)
        except Exception as e:  # asserted on below
            failures.append(e)

    def phase(clients: list[BertClient], n: int, seed: int) -> None:
        threads = [threading.Thread(target=run, args=(c, seed + i, n), daemon=True) for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 150
        for t in threads:
            t.join(max(0.1, deadline - time.monotonic()))
            assert not t.is_alive(), "a client thread did not finish"
        assert not failures, failures[:3]

    with RunningServer(["-model_dir", str(tiny_dir)]) as server:
        clients = [BertClient(port=server.port, timeout=60) for _ in range(n_clients)]
        try:
            phase(clients, warmup, seed=0)
            warm = rss_kb(server.process.pid)
            phase(clients, rounds, seed=1000)
            end = rss_kb(server.process.pid)
        finally:
            for c in clients:
                c.close()
        state = status(server)
    assert state["requests"] == n_clients * (warmup + rounds) and state["errors"] == 0, state
    assert end < warm * 1.10, f"broker RSS grew from {warm} kB to {end} kB"


# ---------------------------------------------------------------- restart


def test_server_restart_on_the_same_port_the_same_client_recovers(tiny_dir, tiny_encoder):
    port = free_port()
    args = ["-model_dir", str(tiny_dir)]
    client = BertClient(port=port, timeout=3)
    try:
        with RunningServer(args, port=port) as first:
            client.encode(["warm up"])
            worker = status(first)["workers"][0]
            # The worker hangs so the request is surely in flight when the server dies.
            os.kill(worker["pid"], signal.SIGSTOP)
            outcome: dict[str, object] = {}

            def send() -> None:
                try:
                    outcome["vectors"] = client.encode(["lost with the server"])
                except Exception as e:  # asserted on below
                    outcome["error"] = e

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            wait_for(lambda: status(first)["workers"][0]["jobs_in_flight"], 2, "the request to reach the worker",
                     interval=0.02)
            first.stop(signal.SIGKILL)
            sender.join(10)
            assert not sender.is_alive() and isinstance(outcome.get("error"), BertTimeoutError), outcome
            assert not group_pids(first.process.pid)
        with RunningServer(args, port=port) as second:
            texts = ["back again", "on the same port"]
            np.testing.assert_allclose(client.encode(texts), tiny_encoder.encode(texts), atol=ATOL)
            assert status(second)["requests"] == 1
    finally:
        client.close()


# ---------------------------------------------------------------- authentication


def test_curve_authentication_admits_only_listed_clients(tmp_path, tiny_dir, tiny_encoder):
    keys, other = tmp_path / "keys", tmp_path / "other"
    for folder, name in ((keys, "client"), (other, "intruder")):
        done = subprocess.run([sys.executable, str(ROOT / "app.py"), "-keygen", str(folder), "-client_name", name],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    for path in ("server.key", "server.key_secret", "client.key_secret", "clients/client.key"):
        assert (keys / path).is_file(), path
    assert not (keys / "clients" / "intruder.key").exists()
    texts = ["only for friends"]
    with RunningServer(["-model_dir", str(tiny_dir), "-auth_dir", str(keys)]) as server:
        allowed = BertClient(port=server.port, timeout=15, server_public_key=str(keys / "server.key"),
                             client_key=str(keys / "client.key_secret"))
        strangers = [
            BertClient(port=server.port, timeout=2),  # no keys at all
            BertClient(port=server.port, timeout=2, server_public_key=str(keys / "server.key"),
                       client_key=str(other / "intruder.key_secret")),  # a valid key pair, not listed
            BertClient(port=server.port, timeout=2, server_public_key=str(other / "server.key"),
                       client_key=str(keys / "client.key_secret")),  # a listed key, the wrong server key
        ]
        try:
            np.testing.assert_allclose(allowed.encode(texts), tiny_encoder.encode(texts), atol=ATOL)
            for stranger in strangers:
                with pytest.raises(BertTimeoutError):
                    stranger.encode(texts)
            with raw_dealer(server.port) as dealer:  # a plain socket's request never reaches the broker
                dealer.send_multipart([header(cmd="status")])
                assert not dealer.poll(1000)
            np.testing.assert_allclose(allowed.encode(texts), tiny_encoder.encode(texts), atol=ATOL)
            state, config = allowed.server_status(), allowed.server_config()
        finally:
            for c in [allowed, *strangers]:
                c.close()
    assert config["authentication"] is True
    assert state["requests"] == 2 and state["bad_requests"] == 0, state  # the strangers never got in


# ---------------------------------------------------------------- signals


@pytest.mark.parametrize("how", ["SIGTERM to the server", "SIGINT to the process group"])
def test_signal_shuts_down_cleanly(how, tiny_dir, tiny_encoder):
    with RunningServer(["-model_dir", str(tiny_dir), "-num_worker", "2"]) as server:
        with BertClient(port=server.port, timeout=15) as client:
            np.testing.assert_allclose(client.encode(["bye"]), tiny_encoder.encode(["bye"]), atol=ATOL)
        pgid = server.process.pid
        assert len(group_pids(pgid)) >= 3  # the broker and its two workers
        if how.startswith("SIGTERM"):
            server.process.send_signal(signal.SIGTERM)
        else:  # what Ctrl-C in a terminal does
            os.killpg(pgid, signal.SIGINT)
        assert server.process.wait(timeout=30) == 0, server.log()[-3000:]
        wait_for(lambda: not group_pids(pgid), 10, "every process of the group to exit")
        assert re.search(r" stopped$", server.log(), re.M), server.log()[-3000:]

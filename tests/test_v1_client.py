"""The 2019 door (`-v1_port`, `-v1_port_out`): the real, unmodified `bert-serving-client==1.10.0`
against a real `python app.py`, compared with our own `BertClient` on the same server.

One module-scoped server on a tiny random BERT (the model does not matter here, only that both doors
give the same vectors), with a small -max_client_batch_size so that the limit is reachable. Sentence
pairs are checked against Hugging Face `transformers` given the same pair and the same weights.

The 2019 client's `timeout` is in milliseconds, -1 (forever) by default: every client here sets one,
so that a lost reply fails the test instead of hanging it.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch
import zmq
from bert_serving.client import BertClient as BertClient2019
from bert_serving.client import ConcurrentBertClient

from helpers import real_sentences
from service.client import BadRequestError, BertClient
from service.harness import ROOT, RunningServer, free_port

ATOL = 1e-6
TIMEOUT_MS = 60_000
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
MAX_SENTENCES = 50


@pytest.fixture(scope="module")
def tiny(random_bert):
    """(folder, the transformers BertModel with the same weights)."""
    return random_bert("service_tiny", **TINY)


@pytest.fixture(scope="module")
def server(tiny):
    v1_port, v1_port_out = free_port(), free_port()
    while v1_port_out == v1_port:
        v1_port_out = free_port()
    # -max_batch_size 4: requests are split into jobs the worker merges, pairs and plain sentences together.
    with RunningServer(["-model_dir", str(tiny[0]), "-v1_port", str(v1_port), "-v1_port_out", str(v1_port_out),
                        "-max_client_batch_size", str(MAX_SENTENCES), "-max_batch_size", "4"]) as running:
        running.v1_port, running.v1_port_out = v1_port, v1_port_out
        yield running


def old_client(server, **kwargs) -> BertClient2019:
    """The 2019 client with all of its default checks on (check_version, check_length, check_token_info)."""
    kwargs.setdefault("timeout", TIMEOUT_MS)
    return BertClient2019(ip="127.0.0.1", port=server.v1_port, port_out=server.v1_port_out, **kwargs)


@pytest.fixture(scope="module")
def ours(server):
    with BertClient(port=server.port, timeout=60) as client:
        yield client


@pytest.fixture
def old(server):
    client = old_client(server)
    yield client
    client.close()


# ---------------------------------------------------------------- the constructor and the config


def test_the_constructor_passes_its_default_checks(server, ours):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "server does not put a restriction on max_seq_len" warning
        client = old_client(server, show_server_config=False)
    try:
        config = client.server_config
        assert config["server_version"] == "1.10.0" == client.status["client_version"]
        assert config["max_seq_len"] == ours.server_config()["max_seq_len"] == client.length_limit > 0
        assert config["show_tokens_to_client"] is True and client.token_info_available
        assert config["dim"] == ours.server_config()["dim"]
        assert (config["port"], config["port_out"]) == (server.v1_port, server.v1_port_out)
        assert client.server_status["workers_ready"] == 1
    finally:
        client.close()


def test_clients_made_one_after_another_all_get_their_config(server):
    # Each constructor asks for the config at once, before its SUB may have subscribed (slow joiner).
    for _ in range(10):
        client = old_client(server)
        assert client.length_limit > 0
        client.close()


# ---------------------------------------------------------------- encoding


def test_encode_gives_our_clients_vectors(old, ours):
    texts = real_sentences(12) + ["a", "Ünïcödé and 中文 and emoji 😀"]
    vectors = old.encode(texts)
    assert vectors.dtype == np.float32 and vectors.shape == (len(texts), ours.server_config()["dim"])
    np.testing.assert_allclose(vectors, ours.encode(texts), atol=ATOL)
    assert old.encode(texts[:2], blocking=True).shape == (2, vectors.shape[1])


def test_output_fmt_list(server, ours):
    client = old_client(server, output_fmt="list")
    try:
        vectors = client.encode(["hello world", "abc"])
        assert isinstance(vectors, list) and isinstance(vectors[0], list)
        np.testing.assert_allclose(np.array(vectors), ours.encode(["hello world", "abc"]), atol=ATOL)
    finally:
        client.close()


def test_show_tokens(old, ours):
    texts = ["First do it", "then do it right, then do it better"]
    vectors, tokens = old.encode(texts, show_tokens=True)
    our_vectors, our_tokens = ours.encode(texts, show_tokens=True)
    assert tokens == our_tokens and tokens[0][0] == "[CLS]" and tokens[0][-1] == "[SEP]"
    np.testing.assert_allclose(vectors, our_vectors, atol=ATOL)


def test_is_tokenized(old, ours):
    tokens = [["first", "do", "it"], ["then", "do", "it", "right"], ["unknownwordpiece##"]]
    vectors = old.encode(tokens, is_tokenized=True)
    np.testing.assert_allclose(vectors, ours.encode(tokens, is_tokenized=True), atol=ATOL)
    assert not np.allclose(vectors[0], old.encode(["first do it right"])[0])


def test_encode_async(old, ours):
    batches = [real_sentences(5, seed=s) for s in range(4)]
    results = sorted(old.encode_async(iter(batches), max_num_batch=len(batches)), key=lambda r: r.id)
    assert len(results) == len(batches)
    for batch, result in zip(batches, results):
        np.testing.assert_allclose(result.embedding, ours.encode(batch), atol=ATOL)


def test_a_burst_of_non_blocking_requests_then_fetch_all_loses_nothing(old, ours):
    batches = [real_sentences(1 + i % 7, seed=100 + i) for i in range(20)]
    for batch in batches:
        assert old.encode(batch, blocking=False) is None
    results = old.fetch_all(sort=True)
    assert len(results) == 20
    for batch, vectors in zip(batches, results):
        np.testing.assert_allclose(vectors, ours.encode(batch), atol=ATOL)
    joined = np.concatenate(results)
    assert joined.shape[0] == sum(map(len, batches))


def test_a_burst_over_max_client_requests_gets_busy_errors_for_the_rest_logged_by_client(server, old, ours):
    """-max_client_requests (64 by default) holds for a 2019 client too: with the worker paused, a
    burst of 70 non-blocking requests gets 64 served and 6 busy errors (raised by the 2019 client as
    its TypeError), and the broker's log names the 2019 client, not the door."""
    batches = [[f"burst {i}"] for i in range(70)]
    worker_pid = ours.server_status()["workers"][0]["pid"]
    first_id = old.request_id + 1  # the 2019 client numbers its requests, its constructor's included
    os.kill(worker_pid, signal.SIGSTOP)
    try:
        for batch in batches:
            assert old.encode(batch, blocking=False) is None
        wait_for_log(server, f"of 'v1:{old.identity.decode()}': server busy")
    finally:
        os.kill(worker_pid, signal.SIGCONT)
    served, busy = [], []
    while old.pending_request:
        try:
            served.extend(old.fetch())
        except TypeError as e:  # the 2019 client's only way to show an error reply
            busy.append(str(e))
    assert len(served) == 64 and len(busy) == 6, (len(served), busy)
    assert all("server busy" in message for message in busy), busy
    for result in served:
        np.testing.assert_allclose(result.embedding, ours.encode(batches[result.id - first_id]), atol=ATOL)
    assert "busy: refused request" in server.log() and "of 646f6f723a7631" not in server.log()  # not "door:v1"


def test_a_flood_of_bad_2019_requests_is_logged_a_line_per_interval_and_the_door_serves_on(server, old, ours):
    logged = server.log().count("bad request from a 2019 client")
    started = time.monotonic()
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5000)
    push.connect(f"tcp://127.0.0.1:{server.v1_port}")
    try:
        for i in range(2000):
            push.send_multipart([b"flood", b"{not json", b"%d" % i, b"0"])
    finally:
        push.close()
        context.term()
    np.testing.assert_allclose(old.encode(["after the flood"]), ours.encode(["after the flood"]), atol=ATOL)
    # Every one was answered (an error reply each, held for a subscriber that never comes, then dropped).
    wait_for_log(server, "dropped 2000 replies to a 2019 client (flood)", timeout=60)
    lines = server.log().count("bad request from a 2019 client") - logged
    assert lines <= 2 + (time.monotonic() - started) / 10, lines  # a line per 10 s at most, not 2,000


def test_replies_held_for_clients_that_never_subscribe_are_capped_and_others_served(tiny):
    """A client that sends requests and never subscribes (or never reads) would make the door hold
    its replies for seconds to minutes, under as many identities as it likes: all held replies
    together are capped at 4 x -max_request_bytes (here 256 KB), the biggest holder losing its
    oldest first, while a 2019 client that reads gets its vectors."""
    v1_port, v1_port_out = free_port(), free_port()
    while v1_port_out == v1_port:
        v1_port_out = free_port()
    # Per-token vectors: 20 sentences x 32 tokens x 32 floats = 80 KB a reply.
    with RunningServer(["-model_dir", str(tiny[0]), "-v1_port", str(v1_port), "-v1_port_out", str(v1_port_out),
                        "-pooling_strategy", "NONE", "-max_seq_len", "32", "-max_request_bytes", "65536"]) as server:
        server.v1_port, server.v1_port_out = v1_port, v1_port_out
        context = zmq.Context()
        push = context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 5000)
        push.connect(f"tcp://127.0.0.1:{v1_port}")
        texts = real_sentences(20, seed=3)
        try:
            for i in range(10):
                push.send_multipart([b"hog", json.dumps(texts).encode(), b"%d" % i, b"%d" % len(texts)])
        finally:
            push.close()
            context.term()
        wait_for_log(server, "that did not subscribe: replies held for all clients together are capped at 0.262 MB",
                     timeout=60)
        client = old_client(server, output_fmt="list")
        try:
            vectors = np.asarray(client.encode(["a reader", "still served"]))
        finally:
            client.close()
        assert vectors.shape[0] == 2 and np.isfinite(vectors).all()
        assert "dropped 10 replies" not in server.log()  # the cap, not the 10 s wait, let most of them go


def test_six_concurrent_clients(server, ours):
    texts = {i: real_sentences(8, seed=200 + i) for i in range(6)}
    got: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            client = old_client(server)
            try:
                got[i] = np.concatenate([client.encode(texts[i]) for _ in range(3)])
            finally:
                client.close()
        except BaseException as e:  # reported below: a thread's exception would be lost
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for i in range(6):
        np.testing.assert_allclose(got[i], np.concatenate([ours.encode(texts[i])] * 3), atol=ATOL)


def test_the_2019_concurrent_client(server, ours):
    client = ConcurrentBertClient(max_concurrency=3, ip="127.0.0.1", port=server.v1_port,
                                  port_out=server.v1_port_out, timeout=TIMEOUT_MS)
    try:
        texts = real_sentences(6, seed=300)
        results: dict[int, np.ndarray] = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, client.encode(texts=texts[i:i + 2])))
                   for i in range(0, 6, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        np.testing.assert_allclose(np.concatenate([results[i] for i in range(0, 6, 2)]), ours.encode(texts), atol=ATOL)
    finally:
        client.close()


# ---------------------------------------------------------------- bad input


def test_bad_input_gets_a_clear_error_and_the_server_serves_on(old, ours):
    with pytest.raises(TypeError, match="bert-as-service refused this request: item 1 is not valid Unicode"):
        old.encode(["fine", "a lone surrogate \ud800"])
    with pytest.raises(TypeError, match=f"over the server's limit of {MAX_SENTENCES}"):
        old.encode(["x"] * (MAX_SENTENCES + 1))
    np.testing.assert_allclose(old.encode(["still serving"]), ours.encode(["still serving"]), atol=ATOL)


def test_raw_messages_that_are_not_the_protocol_and_termination_stop_nothing(server, old, ours):
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(f"tcp://127.0.0.1:{server.v1_port}")
    try:
        push.send_multipart([b"garbage"])
        push.send_multipart([b"x" * 1000, b"SHOW_CONFIG", b"not a number", b"0"])
        push.send_multipart([old.identity, b"TERMINATION", b"999", b"0"])
        push.send_multipart([old.identity, b"{not json", b"998", b"0"])
    finally:
        push.close()
        context.term()
    np.testing.assert_allclose(old.encode(["after the garbage"]), ours.encode(["after the garbage"]), atol=ATOL)
    log = server.log()
    assert "ignored TERMINATION from a 2019 client" in log
    assert "not the 2019 protocol" in log
    assert ours.server_status()["workers_ready"] == 1


# ---------------------------------------------------------------- sentence pairs


@torch.no_grad()
def transformers_pair_vector(model, vocab, first: str, second: str, max_seq_len: int) -> np.ndarray:
    """The server's default pooling for a plain BERT folder (mean of layer -2 over every real token),
    computed from `transformers` given the pair: its own tokenizer, token types and model."""
    from transformers import BertTokenizerFast

    encoded = BertTokenizerFast(str(vocab))(first, second, truncation=True, max_length=max_seq_len,
                                            return_tensors="pt")
    assert encoded["token_type_ids"].sum() > 0  # the second sentence has token type 1
    hidden = model(**encoded, output_hidden_states=True).hidden_states[-2][0]  # (T, H)
    return hidden.mean(dim=0).numpy()


def test_a_pair_is_encoded_as_bert_sentence_pair_like_transformers(old, ours, tiny):
    folder, model = tiny
    pairs = [("First do it", "then do it right"),
             ("a short one", " ".join(["and a second sentence far longer than the first"] * 80))]  # truncated
    with pytest.warns(UserWarning, match="more tokens than"):  # the 2019 client's own length check
        vectors, tokens = old.encode([f"{a} ||| {b}" for a, b in pairs], show_tokens=True)
    max_seq_len = old.length_limit
    for (a, b), vector in zip(pairs, vectors):
        np.testing.assert_allclose(vector, transformers_pair_vector(model, folder / "vocab.txt", a, b, max_seq_len),
                                   atol=1e-5)
    assert tokens[0] == ["[CLS]", "first", "do", "it", "[SEP]", "then", "do", "it", "right", "[SEP]"]
    assert len(tokens[1]) == max_seq_len and tokens[1].count("[SEP]") == 2
    # Our own protocol takes the pair as a 2-item list; the text with ' ||| ' in it is only a sentence there.
    np.testing.assert_allclose(ours.encode([list(p) for p in pairs]), vectors, atol=ATOL)
    assert not np.allclose(ours.encode(["First do it ||| then do it right"])[0], vectors[0], atol=1e-3)
    assert not np.allclose(old.encode(["First do it then do it right"])[0], vectors[0], atol=1e-3)


def test_pairs_and_sentences_mix_in_one_request(ours):
    items = ["plain one", ["First do it", "then do it right"], "plain two", ("a", "b"), "three", "four",
             ["c", "d e f"], "five"]
    together = ours.encode(items)
    alone = np.concatenate([ours.encode([item]) for item in items])
    np.testing.assert_allclose(together, alone, atol=ATOL)
    np.testing.assert_allclose(together[0], ours.encode(["plain one"])[0], atol=ATOL)


def test_our_client_refuses_a_list_that_is_not_a_pair(ours):
    with pytest.raises(BadRequestError, match="a sentence pair is a list of 2 strings"):
        ours.encode([["one", "two", "three"]])
    with pytest.raises(BadRequestError, match="item 0 is list"):
        ours.encode([["one", 2]])


# ---------------------------------------------------------------- the wrong port


def wait_for_log(server, text: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in server.log():
        assert time.monotonic() < deadline, f"{text!r} not in the log:\n{server.log()[-3000:]}"
        time.sleep(0.1)
    return server.log()


def turned_away(ours, more_than: int, timeout: float = 20.0) -> int:
    """server_status()'s count of peers turned away, once it is over `more_than`."""
    deadline = time.monotonic() + timeout
    while (count := ours.server_status()["peers_turned_away"]) <= more_than:
        assert time.monotonic() < deadline, f"no peer turned away within {timeout} s"
        time.sleep(0.1)
    return count


def test_a_2019_client_or_http_at_our_own_port_is_told_about_in_the_log_once(server, ours):
    # ZeroMQ turns the 2019 client's PUSH socket away during the handshake: the broker never sees a message.
    before = ours.server_status()["peers_turned_away"]
    client = BertClient2019(ip="127.0.0.1", port=server.port, port_out=free_port(), ignore_all_checks=True,
                            timeout=500)
    # Its PUSH socket has no peer once the handshake is refused, and a PUSH without a peer blocks in send
    # forever (it did on CI). The 2019 client sets no send timeout, so the test bounds the send itself.
    client.sender.setsockopt(zmq.SNDTIMEO, 2000)
    try:
        with pytest.raises((TimeoutError, zmq.Again)):
            client.encode(["nobody answers this"])
        count = turned_away(ours, before)
        log = wait_for_log(server, "turned away")
    finally:
        client.close()
    line = next(line for line in log.splitlines() if "turned away" in line)
    assert f"port {server.port}" in line and "bert-serving-client (2019)" in line
    assert f"-v1_port {server.v1_port} and -v1_port_out {server.v1_port_out}" in line
    # HTTP at the same port is counted, and not logged again within the hour.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    turned_away(ours, count)
    assert server.log().count("turned away") == 1
    assert ours.encode(["still serving"]).shape[0] == 1


# ---------------------------------------------------------------- start-up


def app_run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "app.py"), "-cpu", "-host", "127.0.0.1", *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ports, message", [
    ({"-v1_port": 1}, "-v1_port and -v1_port_out go together"),
    ({"-v1_port_out": 1}, "-v1_port and -v1_port_out go together"),
    ({"-v1_port": 0, "-v1_port_out": 1}, "-port, -http_port, -v1_port and -v1_port_out must all differ"),
    ({"-v1_port": 1, "-v1_port_out": 1}, "-port, -http_port, -v1_port and -v1_port_out must all differ"),
])
def test_v1_ports_that_cannot_work_are_refused_before_a_worker_starts(tiny, ports, message):
    port, spare = free_port(), free_port()
    argv = [str(v) for flag, offset in ports.items() for v in (flag, port if offset == 0 else spare)]
    run = app_run("-port", str(port), "-model_dir", str(tiny[0]), *argv)
    assert run.returncode == 1 and f"cannot start: {message}" in run.stderr, run.stderr
    assert "ready on" not in run.stderr


def test_a_v1_port_in_use_stops_the_start(tiny):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        run = app_run("-port", str(free_port()), "-model_dir", str(tiny[0]), "-v1_port", str(free_port()),
                      "-v1_port_out", str(taken.getsockname()[1]))
    assert run.returncode == 1, run.stderr
    assert "cannot listen for the 2019 protocol" in run.stderr and "the v1 door exited with code 1" in run.stderr


# ---------------------------------------------------------------- the 2019 server's flags


def test_the_2019_flags_max_seq_len_none_and_first_token_are_understood():
    """`bert-serving-start -max_seq_len NONE -pooling_strategy FIRST_TOKEN` as a 2019 user typed it:
    NONE is as many tokens as the model has positions for (512 for the bundled MiniLM, whose own
    limit is 256), FIRST_TOKEN is CLS_TOKEN; the 2019 client gets the vectors our encoder gives."""
    from bert import Encoder

    long_text = " ".join(["word"] * 400)  # ~400 tokens: cut at 256 by default, kept whole up to 512 with NONE
    texts = ["a short one", long_text]
    v1_port, v1_port_out = free_port(), free_port()
    while v1_port_out == v1_port:
        v1_port_out = free_port()
    with RunningServer(["-max_seq_len", "none", "-pooling_strategy", "FIRST_TOKEN", "-v1_port", str(v1_port),
                        "-v1_port_out", str(v1_port_out)]) as server:
        with BertClient(port=server.port, timeout=60) as ours:
            config = ours.server_config()
        client = BertClient2019(ip="127.0.0.1", port=v1_port, port_out=v1_port_out, timeout=TIMEOUT_MS)
        try:
            got = client.encode(texts)
        finally:
            client.close()
    assert config["max_seq_len"] == 512 and config["pooling_strategy"] == "CLS_TOKEN", config
    expected = Encoder.from_dir(device="cpu", max_seq_len=512, pooling_strategy="CLS_TOKEN").encode(texts)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    cut = Encoder.from_dir(device="cpu", pooling_strategy="CLS_TOKEN").encode(texts)
    assert not np.allclose(got[1], cut[1], atol=1e-3)  # the long text's tokens past 256 were used


def test_max_seq_len_none_or_a_number_and_nothing_else_on_the_command_line():
    port = str(free_port())
    run = app_run("-port", port, "-max_seq_len", "all")
    assert run.returncode == 2 and "-max_seq_len: expected an integer, got 'all'" in run.stderr, run.stderr
    run = app_run("-port", port, "-pooling_strategy", "MIDDLE_TOKEN")
    assert run.returncode == 2 and "FIRST_TOKEN" in run.stderr, run.stderr


def test_a_request_in_flight_when_the_door_dies_still_gets_its_vectors(bundled_encoder):
    """SIGKILL the 2019 door while a large request it passed on is being encoded: the broker restarts
    the door, holds the replies meanwhile, and the new door publishes them to the unchanged 2019
    client by the request's echo. Nothing is lost, and the client goes on working."""
    import os
    import signal

    v1_port, v1_port_out = free_port(), free_port()
    while v1_port_out == v1_port:
        v1_port_out = free_port()
    texts = real_sentences(2000, seed=5)
    with RunningServer(["-v1_port", str(v1_port), "-v1_port_out", str(v1_port_out), "-max_batch_size", "32"]) as server, \
            BertClient(port=server.port, timeout=60) as ours:
        server.v1_port, server.v1_port_out = v1_port, v1_port_out
        old = old_client(server)
        result: dict = {}
        thread = threading.Thread(target=lambda: result.setdefault("vectors", old.encode(texts)), daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not any(w["jobs_in_flight"] for w in ours.server_status()["workers"]):
            assert time.monotonic() < deadline and thread.is_alive(), "the request never reached a worker"
            time.sleep(0.01)
        door = next(d for d in ours.server_status()["doors"] if d["name"] == "v1")
        os.kill(door["pid"], signal.SIGKILL)
        thread.join(timeout=TIMEOUT_MS / 1000 + 30)
        assert "vectors" in result, "the 2019 client got no reply (its timeout passed)"
        vectors = result["vectors"]
        assert vectors.shape == (2000, 384)
        for rows in (slice(0, 20), slice(1980, 2000)):
            assert np.abs(vectors[rows] - bundled_encoder.encode(texts[rows])).max() < 1e-5
        status = ours.server_status()
        assert next(d for d in status["doors"] if d["name"] == "v1")["restarts"] == 1
        assert "asked before this door restarted" in server.log()
        assert np.abs(old.encode(texts[:3]) - bundled_encoder.encode(texts[:3])).max() < 1e-5
        old.close()

"""The HTTP door (`-http_port`): a real `python app.py`, the official `openai` client and plain HTTP
(the standard library's http.client) on 127.0.0.1, compared with `BertClient` on the same server.

Servers:
- `server`: the bundled all-MiniLM-L6-v2, 1 worker, limits small enough to reach (-max_queue 3000,
  -max_client_batch_size 4000, -max_request_bytes 1 MB, -max_client_tokens 100000); shared by most
  tests (module scope);
- `TestStartUpAndKey`: a tiny model whose sentence-transformers pooling config is a named pipe, so
  its worker cannot load the model until the test writes it: "before any worker is ready" is a
  state the test holds, not a race it hopes to win. It runs with an API key from the environment,
  and ends with SIGTERM;
- `TestTinyWithFaults`: a tiny model that does not normalise, one unfinished request per user
  (-max_client_requests 1), fault injection armed by the tests ($BERT_SERVING_FAULT_DIR);
- `TestPerTokenAndKill`: a tiny model with pooling NONE (501 on the embedding routes); its door is
  killed (and comes back), then the main process is SIGKILLed (and the door dies with it).
Processes are found through `server_status()["doors"]` and `/proc`, never by name.
"""
from __future__ import annotations

import base64
import errno
import gzip
import http.client
import json
import os
import resource
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import uvicorn
import zmq

from helpers import HARD_TEXTS, HF_TINY, raw_dealer, real_sentences, scrape
from service.client import BertClient, pack_request, pack_result
from service.harness import RunningServer, free_port, group_pids, proc_stat
from service.http import BODY_READ_TIMEOUT, HEAD_TIMEOUT, MAX_CONNECTIONS

ATOL = 1e-6
DIM = 384
MAX_QUEUE, MAX_INPUTS, MAX_BYTES, MAX_CLIENT_TOKENS = 3000, 4000, 1_000_000, 100_000
API_KEY = "test-key-7f3a9c"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(port: int, method: str, path: str, body: Any = None, raw: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 120) -> Reply:
    """One plain HTTP request (a new connection each time) and its whole answer."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def openai_client(port: int, **kwargs) -> openai.OpenAI:
    kwargs.setdefault("api_key", "unused")
    kwargs.setdefault("max_retries", 0)  # a refusal must show, not be retried away
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", timeout=120, **kwargs)


def vectors_of(response) -> np.ndarray:
    return np.array([item.embedding for item in sorted(response.data, key=lambda d: d.index)], dtype=np.float64)


def assert_openai_error(reply: Reply, status: int, code: str, says: str) -> None:
    assert reply.status == status, (reply.status, reply.body)
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    assert says in error["message"], error


def assert_tei_error(reply: Reply, status: int, error_type: str, says: str) -> None:
    assert reply.status == status, (reply.status, reply.body)
    body = reply.json()
    assert body["error_type"] == error_type and says in body["error"], body


def door_pid(port: int) -> int:
    with BertClient(port=port, timeout=30) as bc:
        (door,) = [d for d in bc.server_status()["doors"] if d["name"] == "http"]
    assert door["alive"]
    return door["pid"]


def alive(pid: int) -> bool:
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.05)


def answers_http(port: int) -> bool:
    """Whether an HTTP server answers on the port. (Not just "a connection succeeds": a connection
    to a free port can, rarely, be given that same port as its source and connect to itself.)"""
    try:
        call(port, "GET", "/health", timeout=10)
        return True
    except (OSError, http.client.HTTPException):
        return False


# ---------------------------------------------------------------- the shared server


@pytest.fixture(scope="module")
def server():
    port = free_port()
    with RunningServer(["-num_worker", "1", "-http_port", str(port), "-max_queue", str(MAX_QUEUE),
                        "-max_client_batch_size", str(MAX_INPUTS), "-max_request_bytes", str(MAX_BYTES),
                        "-max_client_tokens", str(MAX_CLIENT_TOKENS)]) as s:
        s.http_port = port
        yield s


@pytest.fixture(scope="module")
def bc(server):
    with BertClient(port=server.port, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return real_sentences(20, seed=3)


@pytest.fixture(scope="module")
def client(server):
    with openai_client(server.http_port) as c:
        yield c


# ---------------------------------------------------------------- the openai client


def test_openai_default_call_is_base64_on_the_wire_and_equals_bertclient(client, bc, texts):
    raw = client.embeddings.with_raw_response.create(model="my-model", input=texts)
    wire = json.loads(raw.http_response.content)
    assert all(isinstance(item["embedding"], str) for item in wire["data"])  # the SDK asked for base64
    first = np.frombuffer(base64.b64decode(wire["data"][0]["embedding"]), dtype="<f4")
    response = raw.parse()
    expected = bc.encode(texts)
    np.testing.assert_array_equal(first, expected[0])
    np.testing.assert_allclose(vectors_of(response), expected, rtol=0, atol=ATOL)
    assert response.model == "my-model" and response.object == "list"
    assert [d.index for d in response.data] == list(range(len(texts)))
    _, tokens = bc.encode(texts, show_tokens=True)
    assert response.usage.prompt_tokens == response.usage.total_tokens == sum(map(len, tokens))


def test_openai_float_format_and_a_single_string(client, bc, texts):
    response = client.embeddings.create(model="m", input=texts, encoding_format="float")
    np.testing.assert_allclose(vectors_of(response), bc.encode(texts), rtol=0, atol=ATOL)
    single = client.embeddings.create(model="m", input=texts[0])
    assert len(single.data) == 1
    np.testing.assert_allclose(vectors_of(single)[0], bc.encode(texts[:1])[0], rtol=0, atol=ATOL)


def test_2500_inputs_in_one_request(client, bc):
    many = [f"n{i}" for i in range(2500)]  # distinct (a misplaced vector shows) and short (fast)
    response = client.embeddings.create(model="m", input=many)
    assert len(response.data) == 2500
    sample = slice(3, None, 7)  # rows from each of the broker's 10 jobs, at every offset within them
    np.testing.assert_allclose(vectors_of(response)[sample], bc.encode(many[sample]), rtol=0, atol=ATOL)


def test_dimensions_keep_the_first_values_normalised_again(client, bc, texts):
    response = client.embeddings.create(model="m", input=texts[:4], dimensions=64)
    expected = bc.encode(texts[:4])[:, :64]
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    vectors = vectors_of(response)
    assert vectors.shape == (4, 64)
    np.testing.assert_allclose(vectors, expected, rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="m", input=texts[:1], dimensions=DIM + 1)
    assert refused.value.status_code == 400 and "between 1 and the model's 384" in str(refused.value)


def test_token_ids_get_a_400_that_says_to_send_text(client):
    for tokens in ([[101, 7592, 102]], [101, 7592, 102]):  # what LangChain sends by default, and one list
        with pytest.raises(openai.BadRequestError) as refused:
            client.embeddings.create(model="m", input=tokens)
        body = refused.value.body
        assert body["code"] == "token_ids_not_supported" and "check_embedding_ctx_length=False" in body["message"]


def test_models_lists_the_served_model(client):
    (model,) = client.models.list().data
    assert model.id == "sentence-transformers/all-MiniLM-L6-v2" and model.object == "model"


# ---------------------------------------------------------------- TEI routes


def test_tei_embed(server, bc, texts):
    reply = call(server.http_port, "POST", "/embed", {"inputs": texts, "normalize": True, "truncate": True})
    assert reply.status == 200
    np.testing.assert_allclose(np.array(reply.json()), bc.encode(texts), rtol=0, atol=ATOL)
    single = call(server.http_port, "POST", "/embed", {"inputs": texts[0]})
    np.testing.assert_allclose(np.array(single.json()), bc.encode(texts[:1]), rtol=0, atol=ATOL)


def test_tei_embed_truncate_false_refuses_what_the_model_would_cut(server):
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 60)
    assert call(server.http_port, "POST", "/embed", {"inputs": ["short", long_text], "truncate": True}).status == 200
    assert call(server.http_port, "POST", "/embed", {"inputs": ["short"], "truncate": False}).status == 200
    assert_tei_error(call(server.http_port, "POST", "/embed", {"inputs": ["short", long_text], "truncate": False}),
                     422, "validation", "input 1 does not")
    # too many inputs is said before any of them is tokenized for that check
    assert_tei_error(call(server.http_port, "POST", "/embed", {"inputs": [long_text] + ["a"] * MAX_INPUTS,
                                                               "truncate": False}), 413, "validation",
                     "-max_client_batch_size")


def test_tokenize_gives_exactly_the_tokens_the_model_sees(server, bc):
    texts = HARD_TEXTS + ["Hello World!"]
    reply = call(server.http_port, "POST", "/tokenize", {"inputs": texts})
    assert reply.status == 200
    _, seen = bc.encode(texts, show_tokens=True)  # the worker's own tokens
    tokenized = reply.json()
    assert [[t["token"] for t in tokens] for tokens in tokenized] == seen
    last = tokenized[-1]
    assert [(t["text"], t["special"], t["start"], t["stop"]) for t in last] == [
        ("[CLS]", True, None, None), ("Hello", False, 0, 5), ("World", False, 6, 11), ("!", False, 11, 12),
        ("[SEP]", True, None, None)]
    assert all(isinstance(t["id"], int) for tokens in tokenized for t in tokens)
    bare = call(server.http_port, "POST", "/tokenize", {"inputs": "Hello World!", "add_special_tokens": False})
    assert [t["token"] for t in bare.json()[0]] == ["hello", "world", "!"]
    # the door built the model's tokenizer without torch (hundreds of MB it never needs)
    assert "libtorch" not in Path(f"/proc/{door_pid(server.port)}/maps").read_text()


def test_tokenize_answers_up_to_max_client_tokens_and_refuses_more(server):
    text = " ".join(["a"] * 98)  # 100 tokens with [CLS] and [SEP]
    texts = [text] * (MAX_CLIENT_TOKENS // 100)  # 1000 inputs: /tokenize builds its answer in chunks of 256
    full = call(server.http_port, "POST", "/tokenize", {"inputs": texts})
    assert full.status == 200, full.body[:300]
    tokenized = full.json()
    one = call(server.http_port, "POST", "/tokenize", {"inputs": [text]}).json()[0]
    assert len(tokenized) == len(texts) and all(tokens == one for tokens in tokenized)
    assert len(one) == 100 and one[1] == {"id": one[1]["id"], "text": "a", "special": False, "start": 0, "stop": 1,
                                          "token": "a"}
    over = call(server.http_port, "POST", "/tokenize", {"inputs": texts + ["a"]})  # 3 tokens more
    assert_tei_error(over, 413, "validation", f"more than the server's limit of {MAX_CLIENT_TOKENS} tokens")
    assert "-max_client_tokens" in over.json()["error"]
    bare = call(server.http_port, "POST", "/tokenize", {"inputs": texts + ["a"], "add_special_tokens": False})
    assert bare.status == 200 and sum(map(len, bare.json())) == 98 * len(texts) + 1
    assert call(server.http_port, "GET", "/health").status == 200


def test_info(server, bc):
    info = call(server.http_port, "GET", "/info").json()
    config = bc.server_config()
    assert info["model_id"] == "sentence-transformers/all-MiniLM-L6-v2" and info["dim"] == DIM
    assert info["max_input_length"] == config["max_seq_len"] and info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_client_batch_size"] == MAX_INPUTS and info["workers_ready"] == 1


def test_health_is_200_with_a_ready_worker(server):
    reply = call(server.http_port, "GET", "/health")
    assert reply.status == 200 and reply.json() == {"status": "ok", "workers_ready": 1, "workers": 1}


# ---------------------------------------------------------------- metrics


def test_metrics_move_with_requests_and_match_server_status(server, bc, client, texts):
    before = scrape(server.http_port)
    tokens = sum(client.embeddings.create(model="m", input=batch).usage.total_tokens for batch in (texts[:3], texts[3:5]))
    after = scrape(server.http_port)
    moved = {name: after[name] - before.get(name, 0) for name in after}
    assert moved["te_request_success"] == 2 and moved["te_request_count"] == 2
    assert moved["bert_serving_sentences_total"] == 5
    assert moved["te_request_duration_count"] == moved["te_request_queue_duration_count"] == 2
    assert moved["te_request_inference_duration_count"] == 2 and moved["te_request_inference_duration_sum"] > 0
    assert moved["bert_serving_tokens_total"] == tokens
    assert moved["bert_serving_http_responses_total{code=200,route=/v1/embeddings}"] == 2
    status = bc.server_status()  # the same numbers: one source of truth
    assert after["te_request_success"] == status["requests"] and after["bert_serving_workers_ready"] == 1
    assert after["bert_serving_sentences_total"] == status["sentences"]
    assert after["bert_serving_tokens_total"] == status["metrics"]["tokens"]
    assert after["te_request_duration_bucket{le=+Inf}"] == status["metrics"]["total_seconds"]["counts"][-1]
    for name, key in (("replies_dropped_unread", "replies_dropped_unread"), ("disconnected_dropped", "disconnected_dropped"),
                      ("connections_refused", "connections_refused"), ("peers_turned_away", "peers_turned_away")):
        assert after[f"bert_serving_{name}_total"] == status[key], name  # moved by tests/test_hostile.py
    assert 0 < after["bert_serving_loop_max_seconds"] <= status["loop_max_ms"] / 1000
    assert after["bert_serving_model_info{device=cpu,dim=384,dtype=float32,max_seq_len=256,model=" 
                 "sentence-transformers/all-MiniLM-L6-v2,pooling=mean}"] == 1


# ---------------------------------------------------------------- errors


def test_every_error_has_its_status_and_shape_and_the_server_serves_on(server, client, texts):
    port = server.http_port
    before = scrape(port)
    v1 = lambda body=None, raw=None: call(port, "POST", "/v1/embeddings", body, raw)  # noqa: E731
    assert_openai_error(v1(raw=b'{"input": ["a"'), 400, "invalid_json", "not valid JSON")
    assert_openai_error(v1(raw=b""), 400, "invalid_json", "no body")
    assert_openai_error(v1(["a"]), 400, "invalid_json", "must be a JSON object")
    assert_openai_error(v1({"model": "m"}), 400, "missing_input", "'input' is required")
    assert_openai_error(v1({"input": []}), 400, "empty_input", "nothing to embed")
    assert_openai_error(v1({"input": ["a", 3]}), 400, "invalid_type", "'input[1]' must be a string")
    assert_openai_error(v1({"input": {"a": 1}}), 400, "invalid_type", "a string or an array of strings")
    assert_openai_error(v1({"input": "a", "dimensions": "8"}), 400, "invalid_type", "'dimensions' must be an integer")
    assert_openai_error(v1({"input": "a", "dimensions": 0}), 400, "invalid_dimensions", "between 1")
    assert_openai_error(v1({"input": "a", "encoding_format": "hex"}), 422, "invalid_encoding_format", "'float' or 'base64'")
    assert_openai_error(v1(raw=b'{"input": "\\ud800"}'), 400, "invalid_json", "surrogate")
    big = json.dumps({"input": ["x" * 1000] * 1100}).encode()  # 1.1 MB
    assert_openai_error(v1(raw=big), 413, "request_too_large", "-max_request_bytes")
    too_many = v1({"input": ["a"] * (MAX_INPUTS + 1)})
    assert_openai_error(too_many, 413, "too_many_inputs", "-max_client_batch_size")
    assert too_many.json()["error"]["param"] == "input"
    busy = v1({"input": ["a"] * (MAX_QUEUE + 1)})  # more than the queue holds: refused at once
    assert_openai_error(busy, 429, "server_busy", "server busy")
    assert busy.headers["retry-after"] == "1"
    assert_openai_error(call(port, "GET", "/v1/embeddings"), 405, "method_not_allowed", "Method Not Allowed")
    assert_openai_error(call(port, "GET", "/v1/nothing"), 404, "not_found", "Not Found")
    # TEI's shape on TEI routes
    assert_tei_error(call(port, "POST", "/embed", raw=b"{"), 400, "validation", "not valid JSON")
    assert_tei_error(call(port, "POST", "/embed", {"inputs": []}), 400, "empty", "nothing to embed")
    assert_tei_error(call(port, "POST", "/embed", {"inputs": "a", "normalize": "yes"}), 400, "validation",
                     "'normalize' must be true or false")
    assert_tei_error(call(port, "POST", "/embed", raw=big), 413, "validation", "-max_request_bytes")
    assert_tei_error(call(port, "POST", "/embed", {"inputs": ["a"] * (MAX_QUEUE + 1)}), 429, "overloaded", "busy")
    assert_tei_error(call(port, "POST", "/tokenize", {"inputs": 5}), 400, "validation", "'inputs' must be")
    assert_tei_error(call(port, "GET", "/nothing"), 404, "validation", "Not Found")
    # and after all of them, on the same server
    assert vectors_of(client.embeddings.create(model="m", input=texts[:2])).shape == (2, DIM)
    after = scrape(port)
    assert after["te_request_failure{err=overloaded}"] - before["te_request_failure{err=overloaded}"] == 2
    assert after["bert_serving_http_responses_total{code=413,route=/v1/embeddings}"] == 2


def test_bad_values_are_refused_and_name_their_field(server):
    port = server.http_port
    v1 = lambda body=None, raw=None, headers=None: call(port, "POST", "/v1/embeddings", body, raw, headers)  # noqa: E731
    # only a missing or null encoding_format means float
    assert v1({"input": "a", "encoding_format": None}).status == 200
    assert_openai_error(v1({"input": "a", "encoding_format": ""}), 422, "invalid_encoding_format", "got ''")
    for value in (False, 0, {}):
        reply = v1({"input": "a", "encoding_format": value})
        assert_openai_error(reply, 400, "invalid_type", "'encoding_format' must be a string")
        assert reply.json()["error"]["param"] == "encoding_format"
    for value in (5, {"x": 1}, ["u"]):
        reply = v1({"input": "a", "user": value})
        assert_openai_error(reply, 400, "invalid_type", "'user' must be a string")
        assert reply.json()["error"]["param"] == "user"
    huge = v1(raw=b'{"input": "a", "dimensions": 99999999999999999999999}')  # parsed as a float: too large
    assert_openai_error(huge, 400, "invalid_dimensions", "between 1 and the model's 384")
    assert_openai_error(v1({"input": "a", "dimensions": 8.5}), 400, "invalid_type", "'dimensions' must be an integer")
    # compressed and non-UTF-8 bodies are named as such
    zipped = gzip.compress(json.dumps({"input": "a"}).encode())
    assert_openai_error(v1(raw=zipped, headers={"Content-Encoding": "gzip"}), 415, "unsupported_content_encoding",
                        "Content-Encoding 'gzip' is not supported")
    assert_tei_error(call(port, "POST", "/embed", raw=zipped, headers={"Content-Encoding": "gzip"}), 415,
                     "validation", "send the JSON uncompressed")
    assert v1({"input": "a"}, headers={"Content-Encoding": "identity"}).status == 200
    latin1 = '{"input": "café"}'.encode("latin-1")  # é is byte 14
    assert_openai_error(v1(raw=latin1), 400, "invalid_json", "not valid UTF-8 (byte 0xe9 at offset 14)")
    # a trailing slash is an unknown path like any other: no redirect to a URL made of the client's Host
    slash = call(port, "POST", "/v1/embeddings/", {"input": "a"}, headers={"Host": "elsewhere.example"})
    assert_openai_error(slash, 404, "not_found", "Not Found")
    assert "location" not in slash.headers
    assert_tei_error(call(port, "POST", "/embed/", {"inputs": "a"}), 404, "validation", "Not Found")


def read_until_closed(sock: socket.socket) -> bytes:
    """All the server sends until it closes the connection (the socket's timeout bounds the wait)."""
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"the server did not close the connection; it sent {received[:200]!r}") from None
        if not chunk:
            return received
        received += chunk


def test_slow_and_silent_connections_are_closed_but_idle_keep_alive_ones_are_not(server):
    """All start together, so the test waits one deadline (HEAD_TIMEOUT and BODY_READ_TIMEOUT, 30 s)."""
    port = server.http_port
    wait = max(HEAD_TIMEOUT, BODY_READ_TIMEOUT) + 30

    def sent(data: bytes) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=wait)
        sock.sendall(data)
        return sock

    head = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n"
    slow = {"silent": sent(b""), "half a head": sent(head),
            "half a body": sent(head + b'Content-Length: 100\r\n\r\n{"input":'),
            "half a chunked body": sent(b"POST /embed HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                        b'5\r\n{"inp\r\n')}
    idle, next_half = (http.client.HTTPConnection("127.0.0.1", port, timeout=wait) for _ in range(2))
    for connection in (idle, next_half):
        connection.request("GET", "/health")
        assert connection.getresponse().read()
    next_half.sock.sendall(b"GET /health HTTP/1.1\r\nHo")  # after a response: half of the next request's head
    slow["half the next head"] = next_half.sock
    try:
        answers = {name: read_until_closed(sock) for name, sock in slow.items()}
    finally:
        for sock in slow.values():
            sock.close()
    assert answers["silent"] == answers["half a head"] == answers["half the next head"] == b""
    for name, check in (("half a body", assert_openai_error), ("half a chunked body", assert_tei_error)):
        status_line, _, rest = answers[name].partition(b"\r\n")
        headers, _, body = rest.partition(b"\r\n\r\n")
        assert status_line == b"HTTP/1.1 408 Request Timeout" and b"connection: close" in headers.lower(), answers[name]
        reply = Reply(408, {}, body)
        if check is assert_openai_error:
            check(reply, 408, "request_timeout", "the request body stalled")
        else:
            check(reply, 408, "validation", "the request body stalled")
    sock = idle.sock  # idle for a deadline, well within the keep-alive's 75 s: still open and serving
    idle.request("GET", "/health")
    assert idle.getresponse().status == 200 and idle.sock is sock
    idle.close()


def test_connections_past_the_limit_get_a_503_that_says_why(server):
    port = server.http_port
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < MAX_CONNECTIONS + 256:  # this process holds them all
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(MAX_CONNECTIONS + 256, hard), hard))
    held = []
    try:
        for _ in range(MAX_CONNECTIONS):  # idle ones (the door accepts connections in order)
            held.append(socket.create_connection(("127.0.0.1", port), timeout=30))
        refused = call(port, "POST", "/v1/embeddings", {"input": "a"})
        assert_openai_error(refused, 503, "too_many_connections", f"the server has {MAX_CONNECTIONS} connections open")
        assert refused.headers["retry-after"] == "1" and refused.headers["connection"] == "close"
        assert_tei_error(call(port, "POST", "/embed", {"inputs": "a"}), 503, "overloaded", "connections open")
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: call(port, "GET", "/health").status == 200, 30, "a request is served once the others close")
    assert call(port, "POST", "/v1/embeddings", {"input": "a"}).status == 200


@pytest.mark.parametrize("implementation", ["h11_impl:H11Protocol", "httptools_impl:HttpToolsProtocol"])
def test_head_deadline_and_connection_cap_on_either_uvicorn_protocol(implementation):
    """The door runs whichever protocol uvicorn picks (httptools where installed, else h11): the
    mixin, with a 1 s deadline and a cap of 3, on a real uvicorn server of each, in this process."""
    import importlib

    import uvicorn
    from service.http import OVER_CAPACITY, HeadDeadline

    module, name = implementation.split(":")
    base = getattr(importlib.import_module(f"uvicorn.protocols.http.{module}"), name)
    protocol = type("Protocol", (HeadDeadline, base), {"head_timeout": 1.0, "max_connections": 3})

    async def app(scope, receive, send):
        if scope["type"] == "http":
            status = 503 if scope["state"].get(OVER_CAPACITY) else 200
            await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=protocol, log_config=None,
                                           timeout_keep_alive=30))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 30, "uvicorn listens")

    def sent(data: bytes) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        sock.sendall(data)
        return sock

    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        silent, half = sent(b""), sent(b"GET / HTTP/1.1\r\nHo")
        assert read_until_closed(silent) == read_until_closed(half) == b""
        kept = sent(request)
        assert kept.recv(1000).startswith(b"HTTP/1.1 200")
        time.sleep(1.5)  # longer than the head deadline, idle after a response: keep-alive's, not closed
        kept.sendall(request)
        assert kept.recv(1000).startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET / HTTP/1.1\r\nHo")
        assert read_until_closed(kept) == b""
        held = [sent(b"") for _ in range(3)]
        assert sent(request).recv(1000).startswith(b"HTTP/1.1 503")  # the fourth connection
        for sock in held:
            sock.close()
    finally:
        server.should_exit = True
        thread.join(10)


def test_broker_errors_map_to_http_statuses():
    from service.client import ERR_BAD_REQUEST, ERR_BUSY, ERR_SERVER, ERR_TIMEOUT, ERR_UNAVAILABLE
    from service.http import broker_error

    expected = {ERR_BAD_REQUEST: 422, ERR_BUSY: 429, ERR_UNAVAILABLE: 503, ERR_TIMEOUT: 504, ERR_SERVER: 500,
                "some future code": 500}
    for code, status in expected.items():
        error = broker_error({"ok": False, "error": code, "message": "why"})
        assert (error.status, error.message) == (status, "why")
        response = error.response(openai_style=True)
        body = json.loads(response.body)["error"]
        assert body["type"] == ("server_error" if status >= 500 else "rate_limit_error" if status == 429
                                else "invalid_request_error")
        # OpenAI's SDKs retry 5xx unless told not to: a failed encoding fails again; 503, 504, 429 may not
        assert (response.headers.get("x-should-retry") == "false") == (status == 500)


# ---------------------------------------------------------------- clients that leave: cancel


def server_status(server) -> dict:
    with BertClient(port=server.port, timeout=60) as bc:
        return bc.server_status()


def idle(server) -> bool:
    """Nothing queued and no job on a worker."""
    status = server_status(server)
    return status["queued_sentences"] == 0 and not any(w["jobs_in_flight"] for w in status["workers"])


HUNG_UP = "bert_serving_http_responses_total{code=499,route=/v1/embeddings}"
BIG = 2500  # sentences: 10 jobs, of which a CPU worker holds 2; most of it waits in the queue for a while


def test_an_http_client_that_disconnects_has_its_queued_work_dropped(server, client):
    """The tester's case: a client gives up on a big request (a timeout, a retry...). The door tells
    the broker (cancel), which drops the work not yet on a worker, and the same user's next request
    does not wait behind it."""
    wait_until(lambda: idle(server), 120, "the server is idle")
    before, hung_up = server_status(server), scrape(server.http_port).get(HUNG_UP, 0)
    body = json.dumps({"input": real_sentences(BIG, seed=11), "model": "m", "user": "carol"}).encode()
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=60) as conn:
        conn.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: server_status(server)["queued_sentences"] > 0, 60, "the request is queued")
    wait_until(lambda: server_status(server)["cancelled_dropped"] > before["cancelled_dropped"], 30,
               "the broker drops the request of the client that left")
    after = server_status(server)
    assert after["cancelled_dropped"] == before["cancelled_dropped"] + 1
    assert after["queued_sentences"] == 0 and after["disconnected_dropped"] == before["disconnected_dropped"]
    assert scrape(server.http_port)["bert_serving_cancelled_dropped_total"] == after["cancelled_dropped"]
    # Counted as nginx logs a client gone before its answer, not as one of the client's errors.
    wait_until(lambda: scrape(server.http_port).get(HUNG_UP, 0) == hung_up + 1, 30, "the hang-up counted as 499")
    assert len(client.embeddings.create(model="m", input="carol again", user="carol").data) == 1
    wait_until(lambda: idle(server), 120, "the jobs that were on the worker finish")
    done = server_status(server)["workers"][0]["sentences_done"] - before["workers"][0]["sentences_done"]
    assert 1 <= done < BIG - 1000, done  # what was on the worker, and carol's sentence; not the rest


def test_a_cancelled_request_is_dropped_and_never_answered(server):
    """Over the client port: the cancel goes before the next message of the same connection, so the
    status asked right after it already shows the queue without the request."""
    wait_until(lambda: idle(server), 120, "the server is idle")
    before = server_status(server)
    with raw_dealer(server.port) as dealer:
        dealer.send_multipart(pack_request(1, "encode", real_sentences(BIG, seed=12)))
        wait_until(lambda: server_status(server)["queued_sentences"] > 0, 60, "the request is queued")
        dealer.send_multipart(pack_request(1, "cancel"))
        dealer.send_multipart(pack_request(2, "status"))
        assert dealer.poll(30_000)
        header = json.loads(dealer.recv_multipart()[0])
        assert header["id"] == 2 and header["result"]["queued_sentences"] == 0, header
        assert header["result"]["cancelled_dropped"] == before["cancelled_dropped"] + 1
        wait_until(lambda: idle(server), 120, "the jobs that were on the worker finish")
        assert not dealer.poll(300), dealer.recv_multipart()[0]  # their results were discarded: no reply to 1


def test_a_cancel_from_a_req_socket_is_answered_so_the_socket_can_send_again(server):
    """A REQ socket must hear back before it may send again, and has nothing to cancel (its one
    request is answered by then): its cancel gets an error that says so, not the silence a
    DEALER's gets, which would leave the socket stuck for good."""
    context = zmq.Context()
    req = context.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(f"tcp://127.0.0.1:{server.port}")
    try:
        req.send_multipart(pack_request(7, "cancel"))
        assert req.poll(10_000), "no answer to a REQ socket's cancel"
        header = json.loads(req.recv_multipart()[0])
        assert header["id"] == 7 and not header["ok"] and "cancel is for DEALER sockets" in header["message"]
        req.send_multipart(pack_request(8, "config"))
        assert req.poll(10_000)
        header = json.loads(req.recv_multipart()[0])
        assert header["id"] == 8 and header["ok"]
    finally:
        req.close()
        context.term()


def test_a_cancel_of_an_unknown_or_answered_id_is_ignored_quietly(server):
    before = server_status(server)
    with raw_dealer(server.port) as dealer:
        dealer.send_multipart(pack_request(1, "encode", ["answered before it is cancelled"]))
        assert dealer.poll(30_000) and json.loads(dealer.recv_multipart()[0])["ok"]
        dealer.send_multipart(pack_request(1, "cancel"))     # answered already
        dealer.send_multipart(pack_request(77, "cancel"))    # never sent
        dealer.send_multipart(pack_request(2, "config"))
        assert dealer.poll(30_000)
        assert json.loads(dealer.recv_multipart()[0])["id"] == 2  # the first reply after the cancels is this one
        assert not dealer.poll(300)
    after = server_status(server)
    for key in ("cancelled_dropped", "bad_requests", "errors"):
        assert after[key] == before[key], key


def test_bertclient_leaving_encode_async_early_withdraws_what_is_still_out(server):
    wait_until(lambda: idle(server), 120, "the server is idle")
    before = server_status(server)
    with BertClient(port=server.port, timeout=120) as bc:
        results = bc.encode_async([real_sentences(600, seed=seed) for seed in range(20, 24)], max_in_flight=4)
        assert next(results).shape == (600, DIM)
        results.close()  # as leaving the loop does: three requests were still out
        status = bc.server_status()   # sent after the cancels, on the same connection
        assert status["queued_sentences"] == 0
        assert status["cancelled_dropped"] - before["cancelled_dropped"] >= 2  # the last two had not started
        assert bc.encode(["still usable"]).shape == (1, DIM)


class SilentBroker:
    """A broker that answers `status` and `config` but never an encode, as if it had dropped the reply
    (its outbox for the door full, say): what the door must not wait on forever. It notes each command."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind("tcp://127.0.0.1:*")
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.seen: list[tuple[str, int]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stopping.is_set():
            if not self.socket.poll(50):
                continue
            door, header, *_ = self.socket.recv_multipart()
            header = json.loads(header)
            self.seen.append((header["cmd"], header["id"]))
            if header["cmd"] == "status":
                self.socket.send_multipart([door, *pack_result(header["id"], {"workers_ready": 1, "workers": [{}]})])
            elif header["cmd"] == "config":
                self.socket.send_multipart([door, *pack_result(header["id"], {"dim": 8, "max_seq_len": 16})])

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(10)
        self.socket.close(linger=0)
        self.context.term()


def test_the_door_answers_504_when_the_broker_never_replies_and_withdraws_the_request(monkeypatch):
    import service.http
    from service.config import ServerConfig

    monkeypatch.setattr(service.http, "REPLY_MARGIN", 1.0)
    broker = SilentBroker()
    port = free_port()
    door = service.http.HttpDoor(ServerConfig(host="127.0.0.1", max_timeout=1.0), broker.address)
    server = uvicorn.Server(uvicorn.Config(door.app(), log_config=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [service.http.listen("127.0.0.1", port)]},
                              daemon=True)
    thread.start()
    try:
        wait_until(lambda: answers_http(port), 30, "the door answers")
        reply = call(port, "POST", "/v1/embeddings", {"input": ["never answered"]}, timeout=30)
        assert_openai_error(reply, 504, "timeout", "did not answer within 2 s")
        (encode,) = [request_id for cmd, request_id in broker.seen if cmd == "encode"]
        wait_until(lambda: ("cancel", encode) in broker.seen, 10, "the door withdraws the request")
    finally:
        server.should_exit = True
        thread.join(10)
        broker.close()


# ---------------------------------------------------------------- start-up, key, SIGTERM


class LoadGate:
    """A sentence-transformers folder around the tiny test model whose `1_Pooling/config.json` is a
    named pipe: whoever reads it (app.py's check, then the worker's load) waits until `feed()`.
    `open_for_good()` feeds the worker and puts a plain file in the pipe's place for later readers."""

    POOLING = json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}).encode()

    def __init__(self, folder: Path) -> None:
        folder.mkdir()
        for name in ("config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json"):
            (folder / name).symlink_to(HF_TINY / name)
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
        (folder / "1_Pooling").mkdir()
        self.pipe = folder / "1_Pooling" / "config.json"
        os.mkfifo(self.pipe)
        self.folder = folder
        self.opened = False

    def feed(self, timeout: float = 120) -> None:
        """Wait (bounded) for a reader of the pipe, then give it the pooling config."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(self.pipe, os.O_WRONLY | os.O_NONBLOCK)  # fails with ENXIO while nobody reads
                break
            except OSError as e:
                assert e.errno == errno.ENXIO and time.monotonic() < deadline, f"nobody read {self.pipe}: {e}"
                time.sleep(0.05)
        try:
            os.write(fd, self.POOLING)
        finally:
            os.close(fd)

    def open_for_good(self) -> None:
        if not self.opened:
            self.feed()
            plain = self.pipe.with_suffix(".tmp")
            plain.write_bytes(self.POOLING)
            os.replace(plain, self.pipe)
            self.opened = True


class TestStartUpAndKey:
    @pytest.fixture(scope="class")
    def gated(self, tmp_path_factory):
        gate = LoadGate(tmp_path_factory.mktemp("gated") / "model")
        http_port = free_port()
        server = RunningServer(["-model_dir", str(gate.folder), "-http_port", str(http_port)], wait_ready=False,
                               env={"BERT_SERVING_API_KEY": API_KEY})  # the key never is an argument
        server.start()
        try:
            gate.feed(timeout=60)  # app.py's own look at the folder, before it starts anything
            server.http_port, server.gate = http_port, gate
            yield server
        finally:
            server.stop()

    @staticmethod
    def ready(server) -> None:
        server.gate.open_for_good()
        server.wait_until_ready()

    def test_health_is_503_before_any_worker_is_ready_then_200(self, gated):
        port = gated.http_port
        wait_until(lambda: answers_http(port), 60, "the HTTP door answers")
        if not gated.gate.opened:  # the worker waits on the pipe: nothing can be ready yet
            health = call(port, "GET", "/health")
            assert health.status == 503 and health.headers["retry-after"] == "1"
            assert health.json()["error_type"] == "unhealthy" and health.json()["workers_ready"] == 0
            key = {"Authorization": f"Bearer {API_KEY}"}
            refused = call(port, "POST", "/v1/embeddings", {"input": ["a"]}, headers=key)
            assert_openai_error(refused, 503, "no_worker_ready", "no worker is ready")
            assert refused.headers["retry-after"] == "1"
            assert scrape(port)["bert_serving_workers_ready"] == 0
        self.ready(gated)
        health = call(port, "GET", "/health")
        assert health.status == 200 and health.json()["workers_ready"] == 1
        assert scrape(port)["bert_serving_workers_ready"] == 1

    def test_api_key_is_required_on_every_route_but_health_and_metrics(self, gated):
        self.ready(gated)
        port = gated.http_port
        for method, path, body in [("POST", "/v1/embeddings", {"input": "a"}), ("POST", "/embeddings", {"input": "a"}),
                                   ("GET", "/v1/models", None), ("POST", "/embed", {"inputs": "a"}),
                                   ("POST", "/tokenize", {"inputs": "a"}), ("GET", "/info", None)]:
            missing = call(port, method, path, body)
            wrong = call(port, method, path, body, headers={"Authorization": "Bearer not-the-key"})
            right = call(port, method, path, body, headers={"Authorization": f"Bearer {API_KEY}"})
            assert (missing.status, wrong.status, right.status) == (401, 401, 200), (path, missing.body, wrong.body)
            assert missing.headers["www-authenticate"] == "Bearer"
            check = assert_openai_error if path.startswith(("/v1", "/embeddings")) else assert_tei_error
            if check is assert_openai_error:
                check(missing, 401, "missing_api_key", "Authorization: Bearer")
                check(wrong, 401, "invalid_api_key", "invalid API key")
            else:
                check(missing, 401, "unauthorized", "Authorization: Bearer")
        assert call(port, "GET", "/health").status == 200 and call(port, "GET", "/metrics").status == 200
        with openai_client(port, api_key=API_KEY) as good, openai_client(port, api_key="wrong") as bad:
            assert len(good.embeddings.create(model="m", input=["a", "b"]).data) == 2
            with pytest.raises(openai.AuthenticationError):
                bad.embeddings.create(model="m", input=["a"])

    def test_the_key_is_in_no_command_line_no_log_and_no_server_config(self, gated):
        self.ready(gated)
        for pid in group_pids(gated.process.pid):
            assert API_KEY.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert API_KEY not in gated.log()
        with BertClient(port=gated.port, timeout=30) as bc:
            config = bc.server_config()
        assert config["http_api_key"] is True and config["http_port"] == gated.http_port
        assert API_KEY not in json.dumps(config)

    def test_sigterm_stops_the_door_with_the_server(self, gated):
        self.ready(gated)
        door = door_pid(gated.port)
        gated.process.send_signal(signal.SIGTERM)
        assert gated.process.wait(timeout=30) == 0, gated.log()
        wait_until(lambda: not alive(door), 10, f"the door (pid {door}) exits after SIGTERM to the server")
        assert not answers_http(gated.http_port)


# ---------------------------------------------------------------- a tiny model: dimensions, users, failures


class TestTinyWithFaults:
    @pytest.fixture(scope="class")
    def tiny(self, tmp_path_factory):
        faults = tmp_path_factory.mktemp("faults")
        port = free_port()
        with RunningServer(["-model_dir", str(HF_TINY), "-http_port", str(port), "-normalize", "false",
                            "-max_client_requests", "1", "-stall_timeout", "3"],
                           env={"BERT_SERVING_FAULT_DIR": str(faults)}) as s:
            s.http_port, s.faults = port, faults
            yield s

    def test_dimensions_equal_to_the_model_s_are_normalised_too(self, tiny):
        with BertClient(port=tiny.port, timeout=60) as bc:
            raw = bc.encode(["hello world"]).astype(np.float64)
        norm = np.linalg.norm(raw[0])
        assert abs(norm - 1) > 0.01, norm  # this model does not normalise
        with openai_client(tiny.http_port) as client:
            whole = vectors_of(client.embeddings.create(model="m", input="hello world", dimensions=raw.shape[1]))
            plain = vectors_of(client.embeddings.create(model="m", input="hello world"))
        np.testing.assert_allclose(whole[0], raw[0] / norm, rtol=0, atol=ATOL)
        np.testing.assert_allclose(plain[0], raw[0], rtol=0, atol=ATOL)

    def test_a_user_named_like_an_address_is_not_that_address(self, tiny):
        """One unfinished request per user (-max_client_requests 1), the worker paused: a request whose
        `user` is "127.0.0.1" and one from 127.0.0.1 without `user` are both let in, as two users."""
        port = tiny.http_port
        with BertClient(port=tiny.port, timeout=30) as bc:
            tenants = lambda: bc.server_status()["tenants"]  # noqa: E731
            (worker,) = bc.server_status()["workers"]
            base = tenants()
            statuses: dict[str, int] = {}

            def post(name: str, body: dict) -> None:
                statuses[name] = call(port, "POST", "/v1/embeddings", body, timeout=60).status

            posing = threading.Thread(target=post, args=("posing", {"input": "a", "user": "127.0.0.1"}))
            plain = threading.Thread(target=post, args=("plain", {"input": "b"}))
            os.kill(worker["pid"], signal.SIGSTOP)
            try:
                posing.start()
                wait_until(lambda: tenants() == base + 1, 30, "the first request is let in and unfinished")
                plain.start()
                wait_until(lambda: "plain" in statuses or tenants() == base + 2, 30, "the second is answered or let in")
            finally:
                os.kill(worker["pid"], signal.SIGCONT)
        posing.join(60)
        plain.join(60)
        assert statuses == {"posing": 200, "plain": 200}

    def test_a_request_that_failed_on_three_workers_is_not_retried_by_the_sdk(self, tiny):
        port = tiny.http_port
        for fault in ("tokenize", "compute", "stall"):  # one per worker, in the order the job meets them
            (tiny.faults / fault).touch()
        counted = "bert_serving_http_responses_total{code=500,route=/v1/embeddings}"
        before = scrape(port).get(counted, 0)
        with openai_client(port, max_retries=2) as client:
            with pytest.raises(openai.InternalServerError) as failed:
                client.embeddings.create(model="m", input="fails on every worker")
        assert failed.value.status_code == 500 and failed.value.body["code"] == "encoding_failed"
        assert failed.value.response.headers["x-should-retry"] == "false"
        assert scrape(port)[counted] - before == 1  # asked once, though the client may retry twice


# ---------------------------------------------------------------- pooling NONE, door and server killed


class TestPerTokenAndKill:
    @pytest.fixture(scope="class")
    def none_server(self):
        port = free_port()
        with RunningServer(["-model_dir", str(HF_TINY), "-pooling_strategy", "NONE", "-http_port", str(port)]) as s:
            s.http_port = port
            yield s

    def test_per_token_vectors_get_a_501_that_says_why(self, none_server):
        reply = call(none_server.http_port, "POST", "/v1/embeddings", {"input": ["a b c"]})
        assert_openai_error(reply, 501, "per_token_vectors", "-pooling_strategy NONE")
        assert reply.headers["x-should-retry"] == "false"
        assert_tei_error(call(none_server.http_port, "POST", "/embed", {"inputs": "a"}), 501, "backend", "NONE")

    def test_a_killed_door_is_restarted(self, none_server):
        first = door_pid(none_server.port)
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: not alive(first), 10, "the killed door is gone")

        wait_until(lambda: answers_http(none_server.http_port), 60, "a new door serves HTTP")
        assert door_pid(none_server.port) != first

    def test_sigkill_of_the_main_process_takes_the_door_with_it(self, none_server):
        door = door_pid(none_server.port)
        os.kill(none_server.process.pid, signal.SIGKILL)
        none_server.process.wait(timeout=10)
        wait_until(lambda: not alive(door), 10, f"the door (pid {door}) dies with the main process")
        assert not answers_http(none_server.http_port)


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize("args, code, says", [
    (["-http_port", "{port}"], 1, "-http_port and -port must differ"),
    (["-api_key", "k"], 1, "it needs -http_port"),
    (["-http_port", "70000"], 2, "argument -http_port: must be between 1 and 65535"),
])
def test_bad_http_flags_stop_the_start_with_the_reason(args, code, says):
    port = free_port()
    server = RunningServer([a.replace("{port}", str(port)) for a in args], port=port, wait_ready=False).start()
    try:
        assert server.process.wait(timeout=60) == code
        assert says in server.log()
    finally:
        server.stop()


def test_http_port_in_use_stops_the_start_with_exit_1():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        server = RunningServer(["-http_port", str(port)], wait_ready=False).start()
        try:
            assert server.process.wait(timeout=90) == 1
            log = server.log()
        finally:
            server.stop()
    assert "cannot listen for HTTP on 127.0.0.1" in log and "the http door exited" in log, log


def test_the_doors_leave_no_named_semaphore_behind(server):
    """The broker says "ready" with its doors over a pipe, not a multiprocessing.Event, whose named
    semaphores in /dev/shm outlive a process group killed by SIGKILL: none is mapped in the broker
    or in the door."""
    status = BertClient(port=server.port, timeout=60)
    try:
        doors = [d["pid"] for d in status.server_status()["doors"]]
    finally:
        status.close()
    for pid in [server.process.pid, *doors]:
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "/dev/shm/sem." not in maps, [line for line in maps.splitlines() if "/dev/shm" in line]

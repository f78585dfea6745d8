"""Fuzzing the wire protocol: the server-side parser alone, then a real server fed the same frames.

`unpack_request` is the one place where bytes from the network become a request, so the property
is strict: for ANY list of frames it returns a request the broker can act on (every field checked,
the texts re-encodable as the broker re-encodes them for the workers) or raises `BadRequestError`,
never anything else. Any other exception would escape the broker's poll loop and stop the server.
"""
from __future__ import annotations

import json
import math
import time

import pytest
import zmq
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from service.harness import RunningServer
from service.client import (COMMANDS, ERR_BAD_REQUEST, ERR_TIMEOUT, PROTOCOL_VERSION, BadRequestError,
                            check_texts, pack_request, unpack_request)

MAX_SENTENCES = 8         # the server below runs with these limits, so the fuzz reaches the first
MAX_BYTES = 256 * 1024    # and the parser sees everything it generates (the size check comes first)
REPLY_TIMEOUT_MS = 15_000
PROBE_ID = 4_000_000_001  # a config request sent after a valid cancel (which is never answered)

# ---------------------------------------------------------------- strategies

# Text: any code point, or also a lone surrogate, which JSON's "\ud800" escape puts into a Python str.
plain_text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=20)
surrogate_text = st.builds(lambda a, surrogate, b: a + surrogate + b, plain_text,
                           st.characters(categories=["Cs"]), plain_text)
any_text = plain_text | surrogate_text
huge_ints = st.integers(min_value=300, max_value=400).map(lambda digits: 10**digits)  # beyond any float
scalars = st.none() | st.booleans() | st.integers() | huge_ints | st.floats() | any_text
json_values = st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(any_text, children, max_size=4), max_leaves=12)

VALID_HEADER = {"v": st.just(PROTOCOL_VERSION), "id": st.integers(min_value=-2**63, max_value=2**63),
                "cmd": st.sampled_from(COMMANDS), "timeout": st.none() | st.floats(min_value=1e-3, max_value=1e6),
                "is_tokenized": st.booleans(), "show_tokens": st.booleans()}


@st.composite
def headers(draw) -> dict:
    """A valid header with a few fields dropped or given a wrong value, and maybe an unknown one."""
    header = {key: draw(values) for key, values in VALID_HEADER.items()}
    for key in draw(st.sets(st.sampled_from(sorted(header)), max_size=3)):
        if draw(st.booleans()):
            del header[key]
        else:
            header[key] = draw(scalars | json_values)
    if draw(st.booleans()):
        header[draw(any_text)] = draw(json_values)
    return header


texts_values = (st.lists(plain_text, min_size=1, max_size=MAX_SENTENCES + 2)
                | st.lists(any_text, min_size=1, max_size=MAX_SENTENCES + 2)
                | st.lists(st.lists(plain_text, max_size=4), min_size=1, max_size=MAX_SENTENCES + 2)  # tokenized
                | st.lists(st.lists(any_text, max_size=4), min_size=1, max_size=MAX_SENTENCES + 2)
                | st.lists(json_values, max_size=4)
                | json_values)


@st.composite
def json_frame(draw, values) -> bytes:
    """`values` as JSON bytes, written the ways a sender might (or might get wrong)."""
    value = draw(values)
    how = draw(st.sampled_from(["ascii", "utf-8", "latin-1"]))
    if how == "ascii":
        return json.dumps(value).encode()  # lone surrogates travel as "\ud800" escapes
    text = json.dumps(value, ensure_ascii=False)
    if how == "utf-8":  # "surrogatepass": lone surrogates become bytes that no UTF-8 decoder takes
        return text.encode("utf-8", errors="surrogatepass")
    return text.encode("latin-1", errors="replace")  # not UTF-8 beyond ASCII


# Python's JSON parser recurses once per level and gives up near 1000 with a RecursionError.
depths = st.sampled_from([2, 500, 990, 1000, 1010, 5000, 20_000]) | st.integers(min_value=1, max_value=3000)
deeply_nested = depths.map(lambda n: b"[" * n + b"]" * n) | depths.map(lambda n: b'{"a":' * n + b"1" + b"}" * n)
garbage = st.binary(max_size=200) | deeply_nested
any_frame = garbage | json_frame(json_values)
header_frame = json_frame(headers()) | any_frame
texts_frame = json_frame(texts_values) | any_frame

frame_lists = (st.tuples(json_frame(headers()), json_frame(texts_values)).map(list)  # an encode, or nearly
               | st.tuples(json_frame(headers())).map(list)                          # config, status
               | st.tuples(header_frame, texts_frame).map(list)
               | st.tuples(header_frame, texts_frame, st.lists(any_frame, min_size=1, max_size=3))
               .map(lambda t: [t[0], t[1], *t[2]])                                  # too many frames
               | st.lists(any_frame, min_size=1, max_size=6))                        # anything at all


def assert_valid_request(frames: list[bytes], header: dict, texts: list | None) -> None:
    """What the broker relies on when `unpack_request` returns."""
    assert sum(len(f) for f in frames) <= MAX_BYTES
    assert isinstance(header, dict) and header["v"] == PROTOCOL_VERSION
    assert isinstance(header["id"], int) and not isinstance(header["id"], bool)
    assert header["cmd"] in COMMANDS
    timeout = header.get("timeout")
    if timeout is not None:
        assert isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
        assert 0 < float(timeout) < math.inf and time.time() + timeout > time.time() - 1
    for flag in ("is_tokenized", "show_tokens"):
        assert isinstance(header.get(flag, False), bool)
    json.dumps(header)  # the broker echoes the id in its reply
    if header["cmd"] != "encode":
        assert texts is None and len(frames) == 1
        return
    assert len(frames) == 2 and isinstance(texts, list) and 1 <= len(texts) <= MAX_SENTENCES
    for item in texts:
        if header.get("is_tokenized", False):
            assert isinstance(item, list) and all(isinstance(t, str) for t in item)
        else:  # a sentence, or a sentence pair
            assert isinstance(item, str) or isinstance(item, list) and len(item) == 2 and all(isinstance(t, str) for t in item)
    json.dumps(texts, ensure_ascii=False).encode("utf-8")  # exactly what the broker does with each job


# ---------------------------------------------------------------- the parser alone


@settings(max_examples=1500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=frame_lists)
def test_unpack_request_accepts_a_valid_request_or_raises_bad_request(frames):
    try:
        header, texts = unpack_request(frames, MAX_SENTENCES, MAX_BYTES)
    except BadRequestError as e:
        assert str(e), "a BadRequestError must say what is wrong"
        return
    assert_valid_request(frames, header, texts)


@settings(max_examples=300, deadline=None, database=None)
@given(texts=st.lists(any_text, min_size=1, max_size=MAX_SENTENCES), request_id=st.integers(0, 2**62),
       timeout=st.none() | st.floats(min_value=0.001, max_value=1e6), show_tokens=st.booleans())
def test_every_request_the_client_packs_is_accepted_unchanged(texts, request_id, timeout, show_tokens):
    """The other side of the property: the parser refuses nothing the client would send."""
    try:
        check_texts(texts)
    except BadRequestError as e:  # the one thing the client refuses before sending
        assert "surrogate" in str(e)
        assert any(0xD800 <= ord(c) <= 0xDFFF for t in texts for c in t)
        return
    frames = pack_request(request_id, "encode", texts, timeout, False, show_tokens)
    header, parsed = unpack_request(frames, MAX_SENTENCES, 1 << 20)
    assert parsed == texts
    assert (header["id"], header["timeout"], header["show_tokens"]) == (request_id, timeout, show_tokens)


# ---------------------------------------------------------------- headers formatted by hand

# The headers on every request's path are formatted by hand for speed (service/protocol.py, client.py):
# each must read back as exactly what json.dumps of the same fields would give.

seconds = st.none() | st.floats(min_value=0, max_value=1e9) | st.integers(0, 10**6)


@settings(max_examples=300, deadline=None, database=None)
@given(request_id=st.integers(-2**63, 2**63), cmd=st.sampled_from(COMMANDS), timeout=seconds | st.floats(),
       is_tokenized=st.booleans(), show_tokens=st.booleans(), tenant=st.none() | any_text)
def test_a_request_header_reads_back_as_its_fields(request_id, cmd, timeout, is_tokenized, show_tokens, tenant):
    header = json.loads(pack_request(request_id, cmd, None, timeout, is_tokenized, show_tokens, tenant)[0])
    expected = {"v": PROTOCOL_VERSION, "id": request_id, "cmd": cmd, "timeout": timeout,
                "is_tokenized": is_tokenized, "show_tokens": show_tokens}
    if tenant is not None:
        expected["tenant"] = tenant
    # What json.dumps of the fields reads back as: a str holding the two halves of a surrogate pair
    # ("\ud800\udc00") is written as JSON's escape of that pair, which reads as one character.
    expected = json.loads(json.dumps(expected))
    assert header.keys() == expected.keys()
    for key, value in expected.items():
        assert header[key] == value or (key == "timeout" and math.isnan(value) and math.isnan(header[key])), key


@settings(max_examples=300, deadline=None, database=None)
@given(job=st.integers(0, 2**64 - 1), left=seconds, is_tokenized=st.booleans(), show_tokens=st.booleans(),
       dtype=st.sampled_from(["float32", "float16"]) | any_text,
       shape=st.lists(st.integers(0, 2**31), min_size=1, max_size=4), n_tokens=st.integers(0, 2**40),
       compute_ms=st.floats(min_value=0, max_value=1e7))
def test_job_and_result_headers_read_back_as_their_fields(job, left, is_tokenized, show_tokens, dtype, shape,
                                                          n_tokens, compute_ms):
    from service import protocol as P

    assume(all(not 0xD800 <= ord(c) <= 0xDFFF for c in dtype))  # UTF-8 has no lone surrogates
    for is_query in (False, True):
        assert P.read_job_header(P.job_header(job, left, is_tokenized, show_tokens, is_query)) == (
            job, None if left is None else float(left), is_tokenized, show_tokens, is_query)
    # Binary for the two wire dtypes and up to 3 dimensions, JSON otherwise: the same dict either way.
    assert P.read_result_header(P.result_header(job, dtype, tuple(shape), n_tokens, compute_ms)) == {
        "job": job, "ok": True, "dtype": dtype, "shape": shape, "n_tokens": n_tokens, "compute_ms": compute_ms}


@settings(max_examples=300, deadline=None, database=None)
@given(frame=st.binary(max_size=120) | st.builds(lambda tail: b"R" + tail, st.binary(min_size=50, max_size=50))  # RESULT_HEADER.size
       | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_as_a_result_header_read_as_a_dict_and_as_a_job_header_raise_value_error(frame):
    # What a worker of another host sends is read without raising; a head's JOB is checked as strictly.
    from service import protocol as P

    assert isinstance(P.read_result_header(frame), dict)
    if len(frame) != P.JOB_HEADER.size:
        with pytest.raises(ValueError):
            P.read_job_header(frame)


@settings(max_examples=200, deadline=None, database=None)
@given(request_id=st.integers(-2**63, 2**63), dtype=st.sampled_from(["float32", "float16"]),
       shapes=st.lists(st.lists(st.integers(0, 2**31), min_size=2, max_size=3), min_size=1, max_size=4),
       n_tokens=st.integers(0, 2**40))
def test_a_reply_header_reads_back_as_its_fields(request_id, dtype, shapes, n_tokens):
    from service.client import pack_vectors, unpack_reply_header

    header = unpack_reply_header(pack_vectors(request_id, dtype, shapes, [b""] * len(shapes), None, n_tokens)[0])
    assert header == {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "dtype": dtype, "shapes": shapes,
                      "n_tokens": n_tokens}


def test_the_inputs_that_used_to_crash_the_broker_are_bad_requests():
    """Found by the property above; each of these once escaped as another exception."""
    encode = json.dumps({"v": 1, "id": 1, "cmd": "encode"}).encode()
    cases = {
        "nested header": ([b"[" * 100_000], "header frame is not UTF-8 JSON"),                  # RecursionError
        "nested texts": ([encode, b"[" * 100_000], "texts frame is not UTF-8 JSON"),           # RecursionError
        "lone surrogate": ([encode, b'["ok", "\\ud800"]'], "item 1 is not valid Unicode"),    # UnicodeEncodeError
        "huge timeout": ([json.dumps({"v": 1, "id": 1, "cmd": "status", "timeout": 10**400}).encode()],
                         "'timeout'"),                                                        # OverflowError
        "NaN timeout": ([b'{"v": 1, "id": 1, "cmd": "status", "timeout": NaN}'], "'timeout'"),  # never expires
    }
    for name, (frames, message) in cases.items():
        with pytest.raises(BadRequestError, match=message):
            unpack_request(frames, MAX_SENTENCES, 1 << 20)


# ---------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def fuzz_server(random_bert):
    folder, _ = random_bert("service_tiny", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64)
    with RunningServer(["-model_dir", str(folder), "-max_client_batch_size", str(MAX_SENTENCES),
                        "-max_request_bytes", str(MAX_BYTES)]) as server:
        yield server


@pytest.fixture(scope="module")
def dealer(fuzz_server):
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(f"tcp://127.0.0.1:{fuzz_server.port}")
    yield socket
    socket.close(linger=0)
    context.term()


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=frame_lists)
# A REQ-shaped message, then plain ones on the same connection (they were once answered as REQ's too).
@example(frames=[b"", b'{"v": 1, "id": 1, "cmd": "config"}'])
@example(frames=[b"", b""])
@example(frames=[b'{"v": 1, "id": 2, "cmd": "config"}'])
def test_a_real_server_answers_every_message(fuzz_server, dealer, frames):
    """Every message gets a reply, and the server's verdict is the parser's: bad_request exactly
    when `unpack_request` refuses it, an answer otherwise."""
    assume(sum(len(f) for f in frames) < 4 * MAX_BYTES)  # bigger ones drop the connection (MAXMSGSIZE)
    # An empty frame, then what could be our header: a REQ socket's delimiter, answered as REP would
    # (taken off the request, put back on the reply), whatever this connection sent before.
    enveloped = len(frames) >= 2 and frames[0] == b"" and frames[1][:1] == b"{"
    try:
        header, texts = unpack_request(frames[1:] if enveloped else frames, MAX_SENTENCES, MAX_BYTES)
        expected_ok = True
    except BadRequestError:
        header, texts, expected_ok = None, None, False
    dealer.send_multipart(frames)
    if expected_ok and header["cmd"] == "cancel":  # the one command never answered: the next reply is a probe's
        dealer.send_multipart(pack_request(PROBE_ID, "config"))
        assert dealer.poll(REPLY_TIMEOUT_MS), f"no reply to the probe after {frames!r:.300}"
        assert json.loads(dealer.recv_multipart()[0])["id"] == PROBE_ID, f"a cancel was answered: {frames!r:.300}"
        return
    assert dealer.poll(REPLY_TIMEOUT_MS), f"no reply to {frames!r:.300}\n{fuzz_server.log()[-3000:]}"
    reply = dealer.recv_multipart()
    if enveloped:
        assert reply[0] == b"", reply[:2]
        reply = reply[1:]
    answer = json.loads(reply[0])
    assert answer["v"] == PROTOCOL_VERSION
    assert fuzz_server.process.poll() is None, fuzz_server.log()[-3000:]
    if not expected_ok:
        assert answer["ok"] is False and answer["error"] == ERR_BAD_REQUEST, answer
        return
    assert answer["id"] == header["id"]
    if not answer["ok"]:  # a tiny timeout may pass before the job reaches the model; nothing else may fail
        assert answer["error"] == ERR_TIMEOUT and header.get("timeout") is not None and header["timeout"] < 1, answer
    elif header["cmd"] == "encode":
        assert sum(shape[0] for shape in answer["shapes"]) == len(texts)
        assert len(reply) == 1 + len(answer["shapes"])
    else:
        assert isinstance(answer["result"], dict)


def test_the_fuzzed_server_still_serves(fuzz_server):
    from service.client import BertClient

    with BertClient(port=fuzz_server.port, timeout=15) as client:
        assert client.encode(["still here"]).shape == (1, 32)
        status = client.server_status()
    assert [w["restarts"] for w in status["workers"]] == [0]
    assert status["bad_requests"] > 0  # the fuzz did reach the server

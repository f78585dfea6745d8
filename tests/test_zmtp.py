"""The client port's own ZMTP reader (service/zmtp.py) against real libzmq peers on loopback: what a
libzmq ROUTER did for the broker, it must do, and what libzmq turned away, it must turn away."""
from __future__ import annotations

import select
import socket
import threading
import time

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zmq.utils.monitor import recv_monitor_message

from service.zmtp import (GREETING, HANDSHAKE_TIMEOUT, MAX_COMMAND_BYTES, MAX_FRAMES, MAX_PARSED, MESSAGE_STALL_TIMEOUT,
                          PARSE_BUDGET, ZmtpRouter, _ready_command)

MAX_FRAME = 1 << 20


@pytest.fixture
def router():
    refused: list[str] = []
    r = ZmtpRouter("127.0.0.1", 0, MAX_FRAME, 4, on_refused=refused.append)
    r.refused = refused
    yield r
    r.close()


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def dealer(context: zmq.Context, port: int, identity: bytes | None = None, **options) -> zmq.Socket:
    s = context.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        s.setsockopt(zmq.IDENTITY, identity)
    for name, value in options.items():
        s.setsockopt(getattr(zmq, name), value)
    s.connect(f"tcp://127.0.0.1:{port}")
    return s


def receive(router: ZmtpRouter, n: int = 1, timeout: float = 5.0) -> list[list[bytes]]:
    """`n` whole messages from the router, as it hands them to the broker."""
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n:
        assert time.monotonic() < deadline, f"{len(out)} of {n} messages within {timeout} s"
        try:
            out.append([f.bytes for f in router.recv_multipart()])
        except zmq.Again:
            time.sleep(0.002)
    return out


def wait_until(condition, router: ZmtpRouter, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        router.pump()
        time.sleep(0.002)


def test_messages_from_libzmq_dealers_arrive_whole_in_order_and_replies_are_routed(router, context):
    a = dealer(context, router.port, b"c-alpha")
    b = dealer(context, router.port)  # no identity: the router names it
    for i in range(50):
        a.send_multipart([b"a", str(i).encode()])
        b.send_multipart([b"b", str(i).encode(), b"third frame"])
    got = receive(router, 100)
    from_a = [m for m in got if m[0] == b"c-alpha"]
    from_b = [m for m in got if m[0] != b"c-alpha"]
    assert [m[1:] for m in from_a] == [[b"a", str(i).encode()] for i in range(50)]
    assert [m[1:] for m in from_b] == [[b"b", str(i).encode(), b"third frame"] for i in range(50)]
    b_id = from_b[0][0]
    assert b_id[:1] == b"\x00" and len(b_id) == 5 and {m[0] for m in from_b} == {b_id}
    # Replies of every kind of frame the broker sends: bytes, a view, an array, an empty frame.
    vectors = np.arange(384 * 3, dtype=np.float32).reshape(3, 384)
    router.send_multipart([b"c-alpha", b"header", vectors])
    router.send_multipart([b_id, memoryview(b"to b"), b""])
    assert a.poll(5000) and a.recv_multipart() == [b"header", vectors.tobytes()]
    assert b.poll(5000) and b.recv_multipart() == [b"to b", b""]
    assert router.refused == []


def test_large_messages_cross_many_reads_intact(router, context):
    a = dealer(context, router.port, b"c-big")
    big = np.random.default_rng(0).bytes(MAX_FRAME - 100)
    for size in (0, 1, 255, 256, 70_000, len(big)):
        a.send_multipart([b"h", big[:size]])
    got = receive(router, 6)
    assert [len(m[2]) for m in got] == [0, 1, 255, 256, 70_000, len(big)]
    assert got[-1][2] == big
    router.send_multipart([b"c-big", big])
    assert a.poll(5000) and a.recv() == big


def test_a_taken_or_reserved_identity_gets_one_of_ours(router, context):
    first = dealer(context, router.port, b"c-same")
    first.send(b"1")
    assert receive(router)[0][0] == b"c-same"
    second = dealer(context, router.port, b"c-same")
    second.send(b"2")
    other = receive(router)[0][0]
    assert other != b"c-same" and other[:1] == b"\x00"
    # A reply to "c-same" goes to the first, not to the one that asked for the same name.
    router.send_multipart([b"c-same", b"for the first"])
    assert first.poll(5000) and first.recv() == b"for the first"
    assert not second.poll(200)


def test_heartbeats_are_answered_so_libzmq_keeps_the_connection(router, context):
    a = dealer(context, router.port, b"c-hb", HEARTBEAT_IVL=50, HEARTBEAT_TIMEOUT=150)
    monitor = a.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    a.send(b"hello")
    assert receive(router)[0] == [b"c-hb", b"hello"]
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # 20 heartbeats; unanswered, libzmq drops the link at 150 ms
        router.pump()
        time.sleep(0.01)
    assert not monitor.poll(0), recv_monitor_message(monitor)
    assert router.take_departed() == []
    a.disable_monitor()


def test_a_client_that_leaves_is_reported_once_and_replies_to_it_are_skipped(router, context):
    a = dealer(context, router.port, b"c-leaving")
    a.send(b"x")
    receive(router)
    a.close(linger=0)
    wait_until(lambda: router.by_identity.get(b"c-leaving") is None, router)
    assert router.take_departed() == [b"c-leaving"]
    assert router.take_departed() == []
    router.send_multipart([b"c-leaving", b"late"])  # a reply to a client gone: skipped, no error
    router.send_multipart([b"c-never-was", b"stray"])
    assert router.refused == []


def test_a_client_that_does_not_read_fills_its_quota_then_sends_say_again(router, context):
    a = dealer(context, router.port, b"c-slow", RCVHWM=1)
    a.send(b"x")
    receive(router)
    chunk = b"v" * (512 * 1024)
    sent = 0
    with pytest.raises(zmq.Again):
        for _ in range(200):  # the kernel's buffers and libzmq's take some; then 4 unsent, then Again
            router.send_multipart([b"c-slow", chunk])
            sent += 1
            router.pump()
    assert router.by_identity[b"c-slow"].unsent == 4
    received = 0
    while received < sent:  # reading frees the quota; every reply accepted arrives whole
        router.pump()
        if a.poll(10):
            assert a.recv() == chunk
            received += 1
    assert router.by_identity[b"c-slow"].unsent == 0
    router.send_multipart([b"c-slow", b"again"])
    assert a.poll(5000) and a.recv() == b"again"


@pytest.mark.parametrize("peer", ["http", "probe", "push", "curve", "zmtp2", "huge command"])
def test_peers_that_do_not_speak_this_ports_protocol_are_turned_away(router, context, peer):
    """HTTP, a TCP probe, the 2019 client's PUSH socket, a CurveZMQ client, a ZMTP 2 greeting and an
    oversized command before READY: each is closed during the handshake and reported once; the
    router serves on."""
    if peer == "push":
        s = context.socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(f"tcp://127.0.0.1:{router.port}")
        s.send(b"2019 request", zmq.NOBLOCK)
    elif peer == "curve":
        public, secret = zmq.curve_keypair()
        s = context.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.curve_serverkey, s.curve_publickey, s.curve_secretkey = public, public, secret
        s.connect(f"tcp://127.0.0.1:{router.port}")
    else:
        raw = socket.create_connection(("127.0.0.1", router.port))
        if peer == "http":
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        elif peer == "zmtp2":
            raw.sendall(b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([1, 5]) + b"\x00")
        elif peer == "huge command":  # a good greeting, then a 100 MB "command" before READY: refused unread
            greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([3, 1]) + b"NULL".ljust(20, b"\x00") + b"\x00" * 32
            raw.sendall(greeting + b"\x06" + (100 << 20).to_bytes(8, "big") + b"\x05READY")
        else:
            raw.close()
    wait_until(lambda: router.refused, router)
    assert len(router.refused) == 1 and router.by_fd == {} and router.by_identity == {}
    assert router.take_departed() == []
    good = dealer(context, router.port, b"c-good")
    good.send(b"still serving")
    assert receive(router)[0] == [b"c-good", b"still serving"]


def test_a_peer_silent_after_connecting_is_closed_at_the_handshake_timeout(router):
    raw = socket.create_connection(("127.0.0.1", router.port))
    raw.sendall(b"\xff\x00\x00")  # the start of a greeting, then nothing
    wait_until(lambda: router.by_fd, router)
    router.tick(time.monotonic())
    assert router.by_fd and router.refused == []  # not yet
    router.tick(time.monotonic() + HANDSHAKE_TIMEOUT + 1)
    assert router.by_fd == {} and len(router.refused) == 1
    raw.settimeout(5)
    assert raw.recv(1024)[:1] == b"\xff"  # it was sent our greeting, then the connection closed
    raw.close()


def test_a_frame_over_the_cap_closes_that_connection_before_it_is_read(router, context):
    a = dealer(context, router.port, b"c-huge")
    a.send(b"x" * (MAX_FRAME + 1))
    wait_until(lambda: router.take_departed() == [b"c-huge"], router)
    assert not router.messages
    # A message whose frames together pass the cap, too.
    b = dealer(context, router.port, b"c-parts")
    b.send_multipart([b"y" * (MAX_FRAME // 2)] * 3)
    wait_until(lambda: router.take_departed() == [b"c-parts"], router)
    assert not router.messages
    c = dealer(context, router.port, b"c-frames")
    c.send_multipart([b""] * (MAX_FRAMES + 1))
    wait_until(lambda: router.take_departed() == [b"c-frames"], router)
    c.send_multipart([b""] * MAX_FRAMES)  # as many as the cap: handed over (the broker refuses it, clearly)
    assert receive(router)[0] == [b"c-frames"] + [b""] * MAX_FRAMES
    good = dealer(context, router.port, b"c-ok")
    good.send(b"fine")
    assert receive(router)[0] == [b"c-ok", b"fine"]


def raw_peer(port: int, identity: bytes, start: bytes = b"") -> socket.socket:
    """A plain TCP peer that says READY as a DEALER named `identity`, then sends `start`."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(GREETING + _ready_command({b"Socket-Type": b"DEALER", b"Identity": identity}) + start)
    return sock


def long_frame_header(size: int, more: bool = False) -> bytes:
    """The head of a frame of `size` bytes (the LONG form), whose body the test sends as it likes."""
    return bytes([2 | (1 if more else 0)]) + size.to_bytes(8, "big")


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closed `sock` within `timeout` (what it sent before is read and skipped)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(1 << 16):
            pass
    except socket.timeout:
        return False
    except ConnectionResetError:
        pass
    return True


def test_a_message_that_stops_arriving_is_closed_at_the_stall_deadline(router, context, caplog):
    """A frame sent in part, or a message's first frames and not its last, then nothing: the
    connection is closed once MESSAGE_STALL_TIMEOUT passes without a byte more, and what it held is
    freed. Not closed: a client with no message under way, nor one whose next bytes wait in the
    kernel because the port has not read them (that is this side's delay, not the peer's)."""
    idle = dealer(context, router.port, b"c-idle")
    stalled = raw_peer(router.port, b"c-stalled", long_frame_header(200_000) + b"x" * 100_000)
    parted = raw_peer(router.port, b"c-parted", _zmtp_frame(b"header", 1))  # MORE, then no last frame
    behind = raw_peer(router.port, b"c-behind", long_frame_header(200_000) + b"y" * 50_000)
    wait_until(lambda: len(router.by_identity) == 4 and router.buffered == 100_009 + 6 + 50_009, router)
    router.tick(time.monotonic())
    assert len(router.by_identity) == 4  # not yet
    parted.sendall(PING)  # a command between frames is no progress of the message
    answered = bytearray()

    def ponged() -> bool:
        if select.select([parted], [], [], 0)[0]:
            answered.extend(parted.recv(4096))
        return b"PONG" in answered

    wait_until(ponged, router)  # the PING was read (and answered) before the deadline
    behind.sendall(b"y" * 10_000)  # not read before the deadline: the port's delay
    time.sleep(0.2)
    with caplog.at_level("WARNING", logger="service.zmtp"):
        router.tick(time.monotonic() + MESSAGE_STALL_TIMEOUT + 1)
    assert sorted(router.take_departed()) == [b"c-parted", b"c-stalled"]
    assert set(router.by_identity) == {b"c-idle", b"c-behind"} and router.buffered == 50_009  # the frame's head too
    assert "c-stal".encode().hex() in caplog.text and "had no byte more for" in caplog.text
    assert closed_by_server(stalled, 5) and closed_by_server(parted, 5)
    behind.sendall(b"y" * 140_000)  # its message finishes: handed over whole, nothing held
    assert receive(router)[0] == [b"c-behind", b"y" * 200_000]
    assert router.buffered == 0
    idle.send(b"still here")
    assert receive(router)[0] == [b"c-idle", b"still here"]
    for sock in (stalled, parted, behind):
        sock.close()


def test_unfinished_messages_together_are_capped_and_the_largest_holder_is_closed(context, caplog):
    """`max_buffered` caps the bytes held for messages not yet whole, all connections together: when
    a message grows past it, the connection holding the most is closed (one that stopped sending
    cannot keep every other large request out), the growing one if it is the largest; small
    clients and large messages that fit are served meanwhile."""
    router = ZmtpRouter("127.0.0.1", 0, MAX_FRAME, 4, max_buffered=1_500_000)
    try:
        stalled = raw_peer(router.port, b"c-stalled", long_frame_header(1_000_000) + b"a" * 900_000)
        wait_until(lambda: router.buffered == 900_009, router)  # with the frame's head
        with caplog.at_level("WARNING", logger="service.zmtp"):
            growing = raw_peer(router.port, b"c-growing", long_frame_header(1_000_000) + b"b" * 700_000)
            wait_until(lambda: router.take_departed() == [b"c-stalled"], router)
        assert "was the largest when the bytes held for all of them were to pass 1500000" in caplog.text
        assert closed_by_server(stalled, 5)
        wait_until(lambda: router.buffered == 700_009, router)
        assert set(router.by_identity) == {b"c-growing"}
        small = dealer(context, router.port, b"c-small")
        small.send_multipart([b"header", b"s" * 300_000])  # fits beside it: served
        assert receive(router)[0] == [b"c-small", b"header", b"s" * 300_000]
        with caplog.at_level("WARNING", logger="service.zmtp"):  # now the one that grows is the largest
            biggest = raw_peer(router.port, b"c-biggest", long_frame_header(1_000_000) + b"c" * 900_000)
            wait_until(lambda: router.take_departed() == [b"c-biggest"], router)
        assert "would take the bytes held for unfinished messages past 1500000" in caplog.text
        assert closed_by_server(biggest, 5) and router.buffered == 700_009
        growing.sendall(b"b" * 300_000)
        assert receive(router)[0] == [b"c-growing", b"b" * 1_000_000]
        assert router.buffered == 0
        # Large messages from several clients at once, together under the cap: all arrive whole.
        senders = [dealer(context, router.port, b"c-big%d" % i) for i in range(3)]
        for i, sender in enumerate(senders):
            sender.send(bytes([i]) * 450_000)
        got = sorted(receive(router, 3))
        assert got == [[b"c-big%d" % i, bytes([i]) * 450_000] for i in range(3)] and router.buffered == 0
        for sock in (stalled, growing, biggest):
            sock.close()
    finally:
        router.close()


# ---------------------------------------------------------------- through a real server

@pytest.mark.parametrize("port_kind", ["own reader", "-zmq_client_port"])
def test_a_real_server_serves_the_same_vectors_through_either_client_port(port_kind, bundled_encoder, context):
    """BertClient, a bare pyzmq DEALER with heartbeats, and an HTTP request at the wrong port, against
    app.py with the default client port and with -zmq_client_port: the same vectors, the same refusal
    line in the log, and the server serves on."""
    from service.client import BertClient, check_texts, pack_request, unpack_reply_header, unpack_vectors
    from service.harness import RunningServer

    texts = ["a query about the weather", "Héllo Wörld 中文 😀", ""]
    expected = bundled_encoder.encode(texts)
    args = ["-num_worker", "1"] + ([port_kind] if port_kind.startswith("-") else [])
    with RunningServer(args) as server, BertClient(port=server.port, timeout=60) as bc:
        assert np.abs(bc.encode(texts) - expected).max() < 1e-5
        assert bc.server_config()["zmq_client_port"] is (port_kind != "own reader")
        raw = dealer(context, server.port, HEARTBEAT_IVL=50, HEARTBEAT_TIMEOUT=200)
        time.sleep(0.5)  # heartbeats go both ways meanwhile
        raw.send_multipart(pack_request(41, "encode", check_texts(texts[:1]), 60.0), copy=False)
        assert raw.poll(60_000)
        frames = raw.recv_multipart()
        header = unpack_reply_header(frames[0])
        assert header["id"] == 41 and header["ok"]
        assert np.abs(unpack_vectors(header, frames[1:]) - expected[:1]).max() < 1e-5
        http = socket.create_connection(("127.0.0.1", server.port))
        http.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        http.close()  # libzmq reports it when the peer gives up; our reader as soon as it reads it
        deadline = time.monotonic() + 30
        while "turned away during the ZeroMQ handshake" not in server.log():
            assert time.monotonic() < deadline, server.log()[-2000:]
            time.sleep(0.05)
        assert bc.server_status()["peers_turned_away"] == 1
        assert np.abs(bc.encode(texts) - expected).max() < 1e-5


ROUTER_UNDER_FD_LIMIT = r"""
import logging, resource, sys, time, zmq
sys.path.insert(0, sys.argv[1])
from service.zmtp import ZmtpRouter
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
router = ZmtpRouter("127.0.0.1", 0, 1 << 20, 4)
poller = zmq.Poller()
poller.register(router, zmq.POLLIN)
print(router.port, flush=True)
turns, next_tick, deadline = 0, 0.0, time.monotonic() + 60
while time.monotonic() < deadline:  # the broker's loop, in small
    poller.poll(50)
    turns += 1
    now = time.monotonic()
    if now >= next_tick:
        router.tick(now)
        next_tick = now + 0.1
    while True:
        try:
            client, *frames = router.recv_multipart()
        except zmq.Again:
            break
        if frames[0].bytes == b"turns":
            router.send_multipart([client, str(turns).encode()])
        elif frames[0].bytes == b"quit":
            sys.exit(0)
        else:
            router.send_multipart([client, b"echo", *frames])
"""


def test_out_of_file_descriptors_the_port_pauses_accepting_without_spinning_then_recovers(tmp_path, context):
    """A real router process with a low fd limit, flooded with idle connections: it logs once, its
    loop does not spin on the listener it cannot accept from, and it accepts again as fds free up."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "router.py"
    script.write_text(ROUTER_UNDER_FD_LIMIT)
    child = subprocess.Popen([sys.executable, str(script), str(Path(__file__).parent.parent), "40"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    flood: list[socket.socket] = []
    try:
        port = int(child.stdout.readline())
        probe = dealer(context, port, b"c-probe")

        def turns() -> int:
            probe.send(b"turns")
            assert probe.poll(10_000), "the router stopped answering"
            return int(probe.recv())

        turns()  # the probe is connected before the flood
        for _ in range(60):  # more than the 40 fds it may hold
            flood.append(socket.create_connection(("127.0.0.1", port)))
        late = dealer(context, port, b"c-late")
        late.send(b"hello")
        before = turns()
        time.sleep(2.0)
        spent = turns() - before
        assert spent < 200, f"{spent} loop turns in 2 s: the loop spins on a listener it cannot accept from"
        assert not late.poll(0)  # not accepted yet
        for s in flood:
            s.close()
        assert late.poll(10_000), "not accepted once descriptors were free again"
        assert late.recv_multipart() == [b"echo", b"hello"]
        probe.send(b"quit")
        child.wait(timeout=10)
    finally:
        for s in flood:
            s.close()
        if child.poll() is None:
            child.kill()
            child.wait()
    log = child.stderr.read()
    assert log.count("cannot accept client connections") == 1, log


def test_a_zmtp_3_0_peer_written_from_the_spec_is_served(router):
    """Not every client is libzmq (JeroMQ, NetMQ and others implement the spec themselves): a DEALER
    written here from ZMTP 3.0 alone, greeting 3.0, its READY sent before ours is read, a long frame."""
    def frame(body: bytes, flags: int) -> bytes:
        if len(body) > 255:
            return bytes([flags | 2]) + len(body).to_bytes(8, "big") + body
        return bytes([flags, len(body)]) + body

    def prop(name: bytes, value: bytes) -> bytes:
        return bytes([len(name)]) + name + len(value).to_bytes(4, "big") + value

    raw = socket.create_connection(("127.0.0.1", router.port))
    raw.settimeout(10)
    greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\x00") + b"\x00" * 32
    ready = b"\x05READY" + prop(b"Socket-Type", b"DEALER") + prop(b"Identity", b"c-spec")
    long_body = b"L" * 300
    raw.sendall(greeting + frame(ready, 4) + frame(b"header", 1) + frame(long_body, 0))
    assert receive(router)[0] == [b"c-spec", b"header", long_body]
    router.send_multipart([b"c-spec", b"reply", long_body])
    expected = frame(b"reply", 1) + frame(long_body, 0)
    data = b""
    deadline = time.monotonic() + 10
    while not data.endswith(expected):
        assert time.monotonic() < deadline, data[:200]
        router.pump()
        try:
            data += raw.recv(65536)
        except socket.timeout:
            pass
    assert data[:10] == b"\xff" + b"\x00" * 8 + b"\x7f" and data[10] == 3  # our greeting, then our READY
    assert b"\x05READY" in data and b"Socket-Type" in data and b"ROUTER" in data
    raw.close()


@pytest.mark.parametrize("port_kind", ["own reader", "-zmq_client_port"])
def test_a_req_socket_is_answered_as_a_rep_socket_would(port_kind, bundled_encoder, context):
    """A client written with a REQ socket (ZeroMQ's simplest pattern) rather than a DEALER: its empty
    delimiter frame is taken off and put back on the reply, so encode, config and errors all reach it."""
    from service.client import check_texts, pack_request, unpack_reply_header, unpack_vectors
    from service.harness import RunningServer

    args = ["-num_worker", "1"] + ([port_kind] if port_kind.startswith("-") else [])
    with RunningServer(args) as server:
        req = context.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(f"tcp://127.0.0.1:{server.port}")

        def ask(frames: list) -> list[bytes]:
            req.send_multipart(frames)
            assert req.poll(60_000), "no reply to the REQ socket"
            return req.recv_multipart()

        texts = ["a query from a REQ socket", "and a second one"]
        reply = ask(pack_request(1, "encode", check_texts(texts), 60.0))
        header = unpack_reply_header(reply[0])
        assert header["id"] == 1 and header["ok"]
        assert np.abs(unpack_vectors(header, reply[1:]) - bundled_encoder.encode(texts)).max() < 1e-5
        config = unpack_reply_header(ask(pack_request(2, "config"))[0])
        assert config["ok"] and config["result"]["dim"] == 384
        error = unpack_reply_header(ask([b'{"v": 1, "id": 3, "cmd": "encode"}', b"not json"])[0])
        assert error["id"] == 3 and not error["ok"] and error["error"] == "bad_request"
        # Headers that are not a JSON object are answered too, with the envelope: a REQ socket drops
        # a reply without it and could never send again. A leading space is still JSON.
        for bad, says in ((b"hello", "not UTF-8 JSON"), (b"[1]", "must be a JSON object"), (b"", "not UTF-8 JSON")):
            error = unpack_reply_header(ask([bad])[0])
            assert not error["ok"] and error["error"] == "bad_request" and says in error["message"], (bad, error)
        spaced = unpack_reply_header(ask([b' {"v": 1, "id": 8, "cmd": "config"}'])[0])
        assert spaced["id"] == 8 and spaced["ok"]
        assert unpack_reply_header(ask(pack_request(9, "config"))[0])["id"] == 9  # and it sends on
        # A DEALER may send either kind, in any order: each reply takes its own request's shape.
        mixed = dealer(context, server.port)
        for request_id, envelope in ((4, [b""]), (5, []), (6, [b""]), (7, [])):
            mixed.send_multipart(envelope + pack_request(request_id, "config"))
            assert mixed.poll(60_000), "no reply to the DEALER"
            reply = mixed.recv_multipart()
            assert reply[:len(envelope)] == envelope and unpack_reply_header(reply[len(envelope)])["id"] == request_id
        mixed.send_multipart([b"", b"hello"])  # from a DEALER, no envelope before garbage: answered plainly
        reply = mixed.recv_multipart() if mixed.poll(60_000) else []
        assert len(reply) == 1 and unpack_reply_header(reply[0])["error"] == "bad_request", reply
        mixed.send_multipart([b""])  # an empty frame alone is no envelope: a bad request, answered plainly
        assert mixed.poll(60_000) and unpack_reply_header(mixed.recv_multipart()[0])["error"] == "bad_request"


PING = bytes([4, 7]) + b"\x04PING" + b"\x00\x00"  # a PING command with a TTL of 0 and no context
EMPTY_MESSAGE = b"\x00\x00"                       # one frame of 0 bytes: a whole message


class Flood:
    """A raw ZMTP peer that says READY, then sends `unit` over and over for `seconds` (from a thread,
    as the kernel lets it) and never reads: what a hostile or broken client can do to the port."""

    def __init__(self, port: int, unit: bytes, seconds: float) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # our replies back up soon
        self.sock.sendall(GREETING + _ready_command({b"Socket-Type": b"DEALER"}))
        self.sock.settimeout(0.2)
        self.chunk, self.until, self.sent = unit * 50_000, time.monotonic() + seconds, 0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while time.monotonic() < self.until:
            try:
                self.sent += self.sock.send(self.chunk)
            except socket.timeout:
                pass
            except OSError:
                return  # closed by the other side

    def stop(self) -> None:
        self.until = 0.0
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.mark.parametrize("unit", [PING, EMPTY_MESSAGE], ids=["PINGs", "empty messages"])
def test_a_flood_of_tiny_frames_is_parsed_in_bounded_steps_and_others_are_heard(router, context, unit):
    """Millions of 2- to 9-byte frames from one peer: the messages held for the broker never pass
    MAX_PARSED, the PONGs held for a peer that does not read never pass MAX_COMMAND_BYTES, and a
    second client's message gets through within a bounded number of the flood's. (Parsed whole per
    read, an empty-message flood held millions of objects and kept every other client waiting; a
    PING flood grew the broker by 500 MB for 40 MB sent.)"""
    flood = Flood(router.port, unit, seconds=30)
    try:
        wait_until(lambda: any(p.ready for p in router.by_fd.values()), router)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # the broker's loop takes the flood's messages meanwhile
            router.pump()
            assert len(router.messages) <= MAX_PARSED
            for peer in router.by_fd.values():
                assert peer.queued - peer.sent <= MAX_COMMAND_BYTES + 64
            while router.messages:
                router.recv_multipart()
        assert flood.sent > 2_000_000, "the flood did not get going"
        # The other client's handshake done first, and its message sent whole to the kernel before
        # counting: what goes ahead of it is then the port's doing, not the connection's set-up.
        other = socket.create_connection(("127.0.0.1", router.port))
        other.sendall(GREETING + _ready_command({b"Socket-Type": b"DEALER", b"Identity": b"c-other"}))
        deadline = time.monotonic() + 10
        while b"c-other" not in router.by_identity:
            assert time.monotonic() < deadline, "the other client's handshake did not get through"
            router.pump()
            while router.messages:
                router.recv_multipart()
        other.sendall(b"\x01\x06header\x00\x05texts")
        taken, deadline = 0, time.monotonic() + 10
        while True:
            assert time.monotonic() < deadline, "the other client's message did not get through"
            try:
                message = [f.bytes for f in router.recv_multipart()]
            except zmq.Again:
                continue
            if message[0] == b"c-other":
                break
            taken += 1
        other.close()
        assert message == [b"c-other", b"header", b"texts"]
        assert taken <= MAX_PARSED + 2 * PARSE_BUDGET, f"{taken} of the flood's messages went first"
    finally:
        flood.stop()


def test_a_real_server_under_a_flood_keeps_its_memory_and_serves_the_others(bundled_encoder):
    """app.py, flooded by one peer with PINGs and by another with empty messages, neither reading
    its replies: the broker's memory stays put, and a BertClient gets its vectors meanwhile."""
    from service.client import BertClient
    from service.harness import RunningServer, rss_kb

    with RunningServer(["-num_worker", "1"]) as server, BertClient(port=server.port, timeout=60) as bc:
        expected = bundled_encoder.encode(["a query while others flood"])
        assert np.abs(bc.encode(["a query while others flood"]) - expected).max() < 1e-5
        before = rss_kb(server.process.pid)
        floods = [Flood(server.port, PING, seconds=30), Flood(server.port, EMPTY_MESSAGE, seconds=30)]
        try:
            time.sleep(2)
            for _ in range(5):
                assert np.abs(bc.encode(["a query while others flood"]) - expected).max() < 1e-5
            assert all(f.sent > 1_000_000 for f in floods), [f.sent for f in floods]
            growth_mb = (rss_kb(server.process.pid) - before) / 1024
            assert growth_mb < 100, f"the broker grew by {growth_mb:.0f} MB under the flood"
        finally:
            for flood in floods:
                flood.stop()
        assert bc.server_status()["workers_ready"] == 1


# ---------------------------------------------------------------- bytes from anyone

def _zmtp_frame(body: bytes, flags: int) -> bytes:
    if len(body) > 255:
        return bytes([flags | 2]) + len(body).to_bytes(8, "big") + body
    return bytes([flags, len(body)]) + body


_HANDSHAKE = GREETING + _ready_command({b"Socket-Type": b"DEALER"})
_frames = st.lists(st.tuples(st.binary(max_size=300), st.integers(0, 7)), max_size=6).map(
    lambda fs: b"".join(_zmtp_frame(body, flags) for body, flags in fs))
_stream = st.one_of(
    st.binary(max_size=200),                                      # anything at all, from the first byte
    st.builds(lambda g, rest: g + rest, st.sampled_from([GREETING, _HANDSHAKE]), st.binary(max_size=200)),
    st.builds(lambda rest: _HANDSHAKE + rest, _frames),           # well-framed, any flags: MORE, LONG, COMMAND
    st.builds(lambda cut: _HANDSHAKE[:cut], st.integers(0, len(_HANDSHAKE))),  # a handshake cut short
)


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # one router, kept clean
@given(data=_stream, split=st.integers(0, 400))
def test_any_bytes_leave_the_port_consistent_and_serving(router, data, split):
    """Whatever a peer sends, in whatever pieces: no exception leaves `pump` (it would stop the
    broker's loop), the connection is either open with its state consistent or gone, what was
    handed over is whole messages from a peer that said READY, and the next client is served."""
    raw = socket.create_connection(("127.0.0.1", router.port))
    for piece in (data[:split], data[split:]):
        if piece:
            raw.sendall(piece)
        for _ in range(3):
            router.pump()
    messages = []
    while True:
        try:
            messages.append(router.recv_multipart())
        except zmq.Again:
            break
    for message in messages:
        assert len(message) >= 2 and all(isinstance(f, bytes) for f in message)
        assert router.by_identity.get(bytes(message[0])) is not None or bytes(message[0]) in router.departed
    for peer in router.by_fd.values():
        assert len(peer.parts) < MAX_FRAMES and peer.parts_bytes <= MAX_FRAME
        assert peer.ready == (peer.identity in router.by_identity)
    assert router.buffered == sum(peer.held for peer in router.by_fd.values())  # what the cap counts is exact
    raw.close()
    wait_until(lambda: not router.by_fd, router)  # its closing is seen
    with zmq.Context() as ctx:
        good = dealer(ctx, router.port, identity=b"c-next")
        good.send_multipart([b"still", b"here"])
        got = receive(router)[0]
        good.close(0)
    assert got == [b"c-next", b"still", b"here"]
    wait_until(lambda: not router.by_fd, router)
    router.take_departed()

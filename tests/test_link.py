"""The broker <-> local worker link (service/link.py), over real Unix sockets.

The worker's end blocks and reads exactly one message; the broker's end never blocks, keeps what the
socket cannot take yet, and puts messages together from whatever pieces arrive. The server-level
checks (strangers refused, a real worker linked) are in test_backend.py.
"""
from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

from service import protocol as P
from service.link import HEADER, RECV_CHUNK, BrokerSide, LinkClosed, LinkListener, WorkerSide, advance, poll_key


@pytest.fixture
def pair():
    """(the worker's end, the broker's end) of one link."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    worker, broker = WorkerSide(ours), BrokerSide(theirs)
    yield worker, broker
    worker.close()
    broker.close()


def read_until(broker: BrokerSide, count: int, seconds: float = 10.0) -> list:
    """`count` messages from the broker's end, polling as the broker does."""
    messages, deadline = [], time.monotonic() + seconds
    while len(messages) < count and time.monotonic() < deadline:
        select.select([broker], [], [], 0.1)
        messages += broker.read(100)
    return messages


@pytest.mark.parametrize("sizes", [(5,), (3, 0, 4), (0, 0), (1, 1, 1, 1), (2, 7, 0, 3, 1)])
def test_advance_leaves_exactly_the_bytes_not_sent(sizes):
    """What a partial `sendmsg` leaves of a list of views (both ends' outboxes and the client port's),
    at every count of bytes sent, empty frames included."""
    whole = bytes(range(sum(sizes)))
    views, start = [], 0
    for n in sizes:
        views.append(memoryview(whole)[start:start + n])
        start += n
    for sent in range(len(whole) + 1):
        rest = advance(views, sent)
        assert b"".join(bytes(v) for v in rest) == whole[sent:]
        assert all(v.nbytes for v in rest[:1]) or not rest  # the first one left is never an emptied view
    assert advance([], 0) == []


def test_messages_cross_both_ways_as_their_frames(pair):
    worker, broker = pair
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    header = P.result_header(7, "float32", vectors.shape, 9, 1.5)
    worker.send_multipart([P.RESULT, header, vectors], copy=False)
    worker.send_multipart([P.HEARTBEAT])
    (result, heartbeat) = read_until(broker, 2)
    assert result[:2] == [P.RESULT, header] and heartbeat == [P.HEARTBEAT]
    np.testing.assert_array_equal(np.frombuffer(result[2], dtype=np.float32).reshape(3, 4), vectors)

    frame = zmq.Frame(b'["a zmq frame"]')  # what the broker forwards from a client, as it came
    broker.send([P.JOB, P.job_header(3, None, False, False), frame])
    assert not broker.wants_write
    assert worker.recv_multipart() == [P.JOB, P.job_header(3, None, False, False), b'["a zmq frame"]']


@pytest.mark.parametrize("array", [np.ones((2, 3, 4), dtype=np.float16), np.zeros((0, 384), dtype=np.float32)],
                         ids=["per-token float16", "empty"])
def test_any_array_a_worker_sends_arrives_as_its_bytes(pair, array):
    worker, broker = pair
    worker.send_multipart([P.RESULT, b"header", array], copy=False)
    (message,) = read_until(broker, 1)
    assert bytes(message[2]) == array.tobytes()


def test_the_worker_reads_one_message_and_leaves_the_next_for_its_poll(pair):
    worker, broker = pair
    broker.send([P.HEARTBEAT])
    broker.send([P.STOP])
    poller = zmq.Poller()
    poller.register(worker, zmq.POLLIN)
    assert dict(poller.poll(1000)) == {poll_key(worker): zmq.POLLIN}
    assert worker.recv_multipart() == [P.HEARTBEAT]
    assert dict(poller.poll(1000)) == {poll_key(worker): zmq.POLLIN}  # STOP is still there, and said so
    assert worker.recv_multipart() == [P.STOP]
    assert not poller.poll(50)


def test_a_message_the_socket_cannot_take_at_once_waits_in_the_outbox(pair):
    """The broker never blocks: 32 MB to a worker that is not reading yet stays in the outbox, and
    goes out as the worker reads, flushed when the socket has room."""
    worker, broker = pair
    payload = os.urandom(32 << 20)
    broker.send([P.JOB, b"header", payload])
    assert broker.wants_write
    received = {}
    reader = threading.Thread(target=lambda: received.update(frames=worker.recv_multipart()), daemon=True)
    reader.start()
    deadline = time.monotonic() + 30
    while broker.wants_write and time.monotonic() < deadline:
        select.select([], [broker], [], 0.1)
        broker.flush()
    reader.join(30)
    assert not broker.wants_write and received["frames"] == [P.JOB, b"header", payload]


def test_the_broker_puts_a_message_together_from_pieces(pair):
    """Bytes arrive as the kernel hands them over: a message split anywhere, even one byte at a time,
    is read whole, and only when whole."""
    worker, broker = pair
    big = os.urandom(100_000)
    raw = bytearray()
    for frames in ([P.RESULT, b"h" * 10, big], [P.HEARTBEAT], [P.FAILED, b"{}"]):
        raw += HEADER.pack(len(frames), *[len(f) for f in frames], *[0] * (4 - len(frames))) + b"".join(frames)
    first = HEADER.size + len(P.RESULT) + 10 + len(big)
    cuts = [1, 2, HEADER.size - 1, HEADER.size, HEADER.size + 3, 50_000, first - 1, first + 1, len(raw) - 1, len(raw)]
    start, messages = 0, []
    for cut in cuts:
        worker.sock.sendall(raw[start:cut])
        start = cut
        time.sleep(0.01)
        messages += broker.read(100)
        if cut < first:
            assert messages == [], cut  # nothing before the whole of it
        if cut == first + 1:
            assert len(messages) == 1
    assert [bytes(f) for f in messages[0]] == [P.RESULT, b"h" * 10, big]
    assert messages[1:] == [[P.HEARTBEAT], [P.FAILED, b"{}"]]


def test_messages_of_every_size_back_to_back_come_out_whole_and_in_order(pair):
    """Small messages and ones larger than a read (RECV_CHUNK) in one stream: a large one that
    starts in the middle of a read, ends in the middle of another, and one followed at once by the
    next message's header."""
    worker, broker = pair
    sizes = [10, RECV_CHUNK + 1, 20, 3 * RECV_CHUNK, 5, RECV_CHUNK - HEADER.size, RECV_CHUNK, 0, 200_000, 7]
    sent = [[P.RESULT, os.urandom(n)] for n in sizes]
    sender = threading.Thread(target=lambda: [worker.send_multipart(frames) for frames in sent])
    sender.start()  # the socket holds less than all of it: the sender waits on the reader
    received = read_until(broker, len(sent))
    sender.join(timeout=10)
    assert [[bytes(f) for f in m] for m in received] == sent


def test_one_recv_brings_a_small_message_whole(pair):
    """A RESULT of one sentence's vector (the query's case) takes one system call to read, not one
    for the header, one for the body and one more to find the socket empty."""
    worker, broker = pair

    class CountingSocket:  # the real socket, its recv calls counted
        def __init__(self, sock: socket.socket) -> None:
            self.sock, self.calls = sock, 0

        def recv(self, size: int) -> bytes:
            self.calls += 1
            return self.sock.recv(size)

        def recv_into(self, buffer) -> int:
            self.calls += 1
            return self.sock.recv_into(buffer)

        def close(self) -> None:
            self.sock.close()

    counted = broker.sock = CountingSocket(broker.sock)
    vector = np.ones((1, 384), dtype=np.float32)
    worker.send_multipart([P.RESULT, P.result_header(1, "float32", vector.shape, 12, 4.2), vector])
    select.select([counted.sock], [], [], 5)
    (message,) = broker.read(100)
    assert counted.calls == 1
    np.testing.assert_array_equal(np.frombuffer(message[2], dtype=np.float32), vector.ravel())


@pytest.mark.parametrize("header", [
    HEADER.pack(0, 0, 0, 0, 0),          # no frame
    HEADER.pack(9, 1, 1, 1, 1),          # more frames than a message has
    HEADER.pack(1, 5, 7, 0, 0),          # a length past the frame count
])
def test_what_is_not_a_message_closes_the_link(pair, header):
    worker, broker = pair
    worker.sock.sendall(header)
    with pytest.raises(LinkClosed):
        read_until(broker, 1)


def test_a_message_over_the_cap_closes_the_link_before_it_is_read():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    broker = BrokerSide(theirs, max_bytes=1000)
    try:
        ours.sendall(HEADER.pack(2, 10, 1 << 40, 0, 0))  # 1 TB announced: refused, not allocated
        with pytest.raises(LinkClosed, match="over the 1000"):
            read_until(broker, 1)
    finally:
        ours.close()
        broker.close()


def test_either_end_sees_the_other_go(pair):
    worker, broker = pair
    worker.close()
    with pytest.raises(LinkClosed, match="closed"):
        read_until(broker, 1)
    with pytest.raises(LinkClosed):
        for _ in range(100):  # the first sends may still land in the socket's buffer
            broker.send([P.HEARTBEAT])


def test_messages_before_the_end_are_read_before_the_end_is_reported(pair):
    """A worker's last RESULT, then its exit: the broker gets the RESULT first."""
    worker, broker = pair
    worker.send_multipart([P.RESULT, b"last"])
    worker.sock.sendall(HEADER.pack(1, 3, 0, 0, 0) + b"ab")  # half a message, then the end
    worker.close()
    time.sleep(0.05)
    assert broker.read(100) == [[P.RESULT, b"last"]]
    with pytest.raises(LinkClosed, match="closed"):
        broker.read(100)


def test_the_worker_sees_the_broker_close(pair):
    worker, broker = pair
    broker.close()
    with pytest.raises(ConnectionError):
        worker.recv_multipart()


def test_the_listener_names_each_peer_by_the_pid_the_kernel_saw(tmp_path):
    listener = LinkListener(str(tmp_path / "workers"))
    try:
        here = WorkerSide.connect(str(tmp_path / "workers"))
        child = subprocess.Popen([sys.executable, "-c", (
            "import socket, sys, time; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); time.sleep(30)"),
            str(tmp_path / "workers")])
        try:
            peers, deadline = [], time.monotonic() + 30
            while len(peers) < 2 and time.monotonic() < deadline:
                select.select([listener], [], [], 0.2)
                peers += listener.accept()
            assert sorted((pid, uid) for _, pid, uid in peers) == sorted([(os.getpid(), os.getuid()),
                                                                        (child.pid, os.getuid())])
        finally:
            child.kill()
            child.wait(10)
            here.close()
            for conn, _, _ in peers:
                conn.close()
    finally:
        listener.close()
    assert not (tmp_path / "workers").exists()

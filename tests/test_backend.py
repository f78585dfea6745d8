"""The broker's back end: no process but the workers the broker spawned can join it.

A real `python app.py` (tiny random BERT, 2 workers) on 127.0.0.1; the hostile peers are plain Unix
sockets and ZeroMQ sockets that find the workers' socket the way an attacker would, from /proc.
"""
from __future__ import annotations

import json
import os
import re
import socket
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from helpers import TINY, real_sentences
from service import protocol as P
from service.backend import LogLimiter, ready_is_from_spawned
from service.client import BertClient
from service.harness import RunningServer
from service.link import HEADER

ATOL = 1e-5


@pytest.fixture(scope="module")
def server(tiny_dir):
    with RunningServer(["-model_dir", str(tiny_dir), "-num_worker", "2"]) as server:
        yield server


# ---------------------------------------------------------------- finding the back end, as an attacker would


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process `pid` holds open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def unix_socket_paths(pid: int) -> list[str]:
    """Paths of the Unix sockets `pid` has bound (from /proc/net/unix)."""
    inodes = socket_inodes(pid)
    paths = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[6] in inodes:
            paths.append(fields[7])
    return paths


def listening_tcp_ports(pid: int) -> set[int]:
    """TCP ports `pid` listens on (state 0A in /proc/net/tcp and tcp6)."""
    inodes = socket_inodes(pid)
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def backend_path(server: RunningServer) -> str:
    paths = {p for p in unix_socket_paths(server.process.pid) if p.endswith("/workers")}  # + accepted ones
    assert len(paths) == 1, unix_socket_paths(server.process.pid)
    return paths.pop()


def status(server: RunningServer) -> dict:
    with BertClient(port=server.port, timeout=15) as client:
        return client.server_status()


# ---------------------------------------------------------------- tests


def test_the_back_end_is_a_unix_socket_in_a_private_folder_not_a_tcp_port(server):
    path = backend_path(server)
    folder = os.stat(os.path.dirname(path))
    assert stat.S_IMODE(folder.st_mode) == 0o700 and folder.st_uid == os.getuid()
    # The client port is the only TCP port the broker listens on.
    assert listening_tcp_ports(server.process.pid) == {server.port}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_another_local_user_cannot_connect_to_the_back_end(server):
    path = backend_path(server)
    child = os.fork()  # the child only drops to user "nobody" and connects: no exec, no threads used
    if child == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            socket.socket(socket.AF_UNIX).connect(path)
            code = 0
        except PermissionError:
            code = 13
        finally:
            os._exit(code)
    _, wait_status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 13  # EACCES: the 0700 folder keeps it out


def closed_by_peer(conn: socket.socket) -> bool:
    """Whether the other end closed `conn` (waiting up to 10 s), having sent nothing before."""
    conn.settimeout(10)
    try:
        return conn.recv(1 << 16) == b""
    except ConnectionResetError:  # closed with what we sent unread
        return True


def test_a_process_the_broker_did_not_spawn_is_refused_logged_and_given_no_job(server, tiny_encoder):
    """A same-user process that finds the socket connects, as plain Unix sockets and as a ZeroMQ
    DEALER (what the back end was before the link), says READY with a real worker's pid, and keeps
    trying. The broker takes links only from the pids it spawned, as the kernel reports them."""
    path = backend_path(server)
    real_pid = status(server)["workers"][0]["pid"]
    body = json.dumps({"pid": real_pid, "device": "cpu", "encoder": {}, "threads": 1, "capacity": 2}).encode()
    ready = HEADER.pack(2, len(P.READY), len(body), 0, 0) + P.READY + body
    started = time.monotonic()
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(f"ipc://{path}")
        dealer.send_multipart([P.READY, body])
        for _ in range(3):
            forger = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            forger.connect(path)
            with forger:
                try:
                    forger.sendall(ready)
                except (BrokenPipeError, ConnectionResetError):  # closed before it said anything
                    pass
                assert closed_by_peer(forger)
        texts = real_sentences(40, seed=3)
        expected = tiny_encoder.encode(texts)
        with BertClient(port=server.port, timeout=30) as client:
            for i in range(20):
                np.testing.assert_allclose(client.encode(texts[i:i + 20]), expected[i:i + 20], atol=ATOL)
        assert not dealer.poll(200), f"the forger was sent {dealer.recv_multipart()!r}"
    finally:
        dealer.close(linger=0)
        context.term()
    # One line at once, then one per 10 s at most (the DEALER reconnects every 100 ms).
    lines = re.findall(rf"refused a connection to the workers' socket from pid {os.getpid()}: not a worker "
                       "this broker spawned", server.log())
    assert 1 <= len(lines) <= 1 + (time.monotonic() - started) // 10, server.log()
    state = status(server)
    assert state["workers_ready"] == 2 and [w["restarts"] for w in state["workers"]] == [0, 0], state
    assert sum(w["jobs_done"] for w in state["workers"]) >= 20


def test_ready_is_taken_only_with_the_pid_the_broker_spawned():
    assert ready_is_from_spawned({"pid": 1234, "device": "cpu"}, 1234)
    assert not ready_is_from_spawned({"pid": 4321}, 1234)
    assert not ready_is_from_spawned({"pid": "1234"}, 1234)
    assert not ready_is_from_spawned({}, 1234)
    assert not ready_is_from_spawned([1234], 1234)
    assert not ready_is_from_spawned({"pid": 1234}, None)


def test_the_log_about_strangers_is_rate_limited(caplog):
    import logging

    limiter = LogLimiter(logging.getLogger("test_backend"), interval=3600)
    with caplog.at_level(logging.WARNING, logger="test_backend"):
        for i in range(100):
            limiter.warning("stranger %d", i)
    assert [r.getMessage() for r in caplog.records] == ["stranger 0"]
    limiter.next_at, limiter.logged_at = 0.0, limiter.logged_at - 4000  # the interval has passed, and more
    with caplog.at_level(logging.WARNING, logger="test_backend"):
        limiter.warning("stranger %d", 100)
    assert caplog.records[-1].getMessage() == ("stranger 100 (99 more like it since the last such line, 4000 s ago, "
                                               "not logged)")


# ---------------------------------------------------------------- workers of other hosts: the pure parts


def test_a_model_fingerprint_ignores_the_path_and_names_the_part_that_differs(random_bert, tiny_dir, tmp_path):
    import shutil

    from bert.checkpoint import inspect_folder
    from service.backend import fingerprint_mismatch, model_fingerprint

    ours = model_fingerprint(inspect_folder(tiny_dir))
    copy = tmp_path / "elsewhere"
    shutil.copytree(tiny_dir, copy)
    assert model_fingerprint(inspect_folder(copy)) == ours and fingerprint_mismatch(ours, ours) is None
    reseeded = model_fingerprint(inspect_folder(random_bert("backend_reseeded", seed=9, **TINY)[0]))
    assert reseeded["config"] == ours["config"] and reseeded["vocab"] == ours["vocab"]
    assert "differs from the head's in its weights (" in fingerprint_mismatch(ours, reseeded)
    wider = model_fingerprint(inspect_folder(random_bert("backend_wider", **{**TINY, "hidden_size": 64})[0]))
    assert "in its config and weights" in fingerprint_mismatch(ours, wider)
    assert fingerprint_mismatch(ours, None) == "the worker sent no model fingerprint"


def test_capacity_is_what_a_worker_asks_for_within_bounds():
    from service.backend import capacity_of, jobs_wanted

    assert jobs_wanted("cuda:1") == 2 * P.WORKER_PREFETCH_JOBS > jobs_wanted("cpu") >= 2
    assert capacity_of({"capacity": 8}) == 8
    assert capacity_of({"capacity": 10**9}) == P.MAX_WORKER_CAPACITY
    assert capacity_of({"capacity": 0}) == capacity_of({"capacity": -5}) == 1
    assert capacity_of({}) == capacity_of({"capacity": "8"}) == capacity_of({"capacity": True}) == P.WORKER_PREFETCH_JOBS


def test_worker_keys_are_kept_apart_from_client_keys_and_never_replaced(tmp_path):
    from service.auth import make_worker_keys

    paths = make_worker_keys(tmp_path, "gpu-a")
    assert paths["worker_public"] == tmp_path / "workers" / "gpu-a.key" and paths["worker_public"].is_file()
    assert paths["worker_secret"] == tmp_path / "workers" / "gpu-a.key_secret" and not (tmp_path / "clients").exists()
    before = paths["worker_secret"].read_bytes()
    with pytest.raises(ValueError, match="exists: -keygen never replaces a key"):
        make_worker_keys(tmp_path, "gpu-a")
    assert paths["worker_secret"].read_bytes() == before
    assert oct(paths["worker_secret"].stat().st_mode & 0o777) == "0o600"
    for name in ("", "../gpu-b", ".hidden"):
        with pytest.raises(ValueError, match="must be 1 to 64 letters"):
            make_worker_keys(tmp_path, name)


def test_a_frame_too_large_for_any_worker_is_cut_off_at_the_worker_port(tiny_dir, tiny_encoder):
    """Without -auth_dir anyone on the network may connect to the worker port: a peer sending a
    frame larger than any RESULT can be (per-token vectors of a full mini-batch) is disconnected by
    ZeroMQ before the frame is held, and the head serves on with its own worker."""
    from bert import EncoderOptions
    from bert.checkpoint import inspect_folder
    from service.backend import largest_result_bytes
    from service.config import ServerConfig
    from service.harness import free_port
    from zmq.utils.monitor import recv_monitor_message

    worker_port = free_port()
    with RunningServer(["-model_dir", str(tiny_dir), "-num_worker", "1", "-worker_port", str(worker_port)]) as head:
        config = ServerConfig(encoder=EncoderOptions(model_dir=str(tiny_dir)))  # the head's defaults
        limit = largest_result_bytes(inspect_folder(str(tiny_dir)), config)
        assert limit < 64 << 20  # a tiny model: the bound follows the model, not a fixed size
        context = zmq.Context()
        try:
            peer = context.socket(zmq.DEALER)
            monitor = peer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            peer.connect(f"tcp://127.0.0.1:{worker_port}")
            peer.send_multipart([P.HELLO, b"x" * (limit + 1)], copy=False)
            assert monitor.poll(30_000), "the head kept reading a frame larger than any worker sends"
            assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
        finally:
            context.destroy(linger=0)
        with BertClient(port=head.port, timeout=60) as client:
            got = client.encode(["still serving"])
            assert client.server_status()["workers_ready"] == 1
        np.testing.assert_allclose(got, tiny_encoder.encode(["still serving"]), atol=ATOL)

"""Other hosts: a client on another host (the server runs in its own network namespace, joined to
this one by a veth pair, so requests cross a network interface rather than loopback; root and
iproute2 needed, skipped otherwise), and worker hosts that join a head (`-worker_port`, `-join`).
"""
from __future__ import annotations

import os
import random
import re
import shutil
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

from helpers import real_sentences
from service import protocol as P
from service.config import ServerConfig
from service.client import BertClient, BertTimeoutError, pack_request, unpack_reply_header, unpack_vectors
from service.harness import ROOT, RunningServer, RunningWorkerHost, free_port, wait_for


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture(scope="module")
def server_host():
    """(namespace, its address as this host sees it); removed afterwards, its veth pair with it."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make a second host (ip netns)")
    tag = os.getpid() % 10000
    namespace, here, there = f"bas-test-{tag}", f"bash{tag}", f"bass{tag}"
    subnet = f"10.231.{tag % 250}"
    try:
        try:
            ip("netns", "add", namespace)
            ip("netns", "exec", namespace, "ip", "link", "set", "lo", "up")  # the workers reach the broker on it
            ip("link", "add", here, "type", "veth", "peer", "name", there)
            ip("link", "set", there, "netns", namespace)
            ip("addr", "add", f"{subnet}.1/30", "dev", here)
            ip("link", "set", here, "up")
            ip("netns", "exec", namespace, "ip", "addr", "add", f"{subnet}.2/30", "dev", there)
            ip("netns", "exec", namespace, "ip", "link", "set", there, "up")
        except (subprocess.CalledProcessError, OSError) as e:
            pytest.skip(f"cannot make a second host with ip netns here: {getattr(e, 'stderr', b'') or e}")
        yield namespace, f"{subnet}.2"
    finally:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=10)  # if it never moved


class ServerIn(RunningServer):
    """`app.py` started inside a network namespace, listening where `host` says."""

    def __init__(self, namespace: str, host: str) -> None:
        super().__init__(["-host", host])
        self.namespace = namespace

    @property
    def command(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *super().command]


def test_a_client_on_another_host_gets_the_same_vectors_and_host_127_0_0_1_keeps_it_out(
        server_host, bundled_encoder):
    namespace, address = server_host
    texts = real_sentences(50, seed=7)
    with ServerIn(namespace, "*") as open_server, ServerIn(namespace, "127.0.0.1") as local_server:
        with BertClient(ip=address, port=open_server.port, timeout=60) as bc:
            np.testing.assert_allclose(bc.encode(texts), bundled_encoder.encode(texts), rtol=0, atol=1e-5)
            assert bc.server_status()["workers_ready"] == 1
        # Listening on 127.0.0.1 only: nothing from outside the host gets an answer.
        with BertClient(ip=address, port=local_server.port, timeout=3) as bc:
            with pytest.raises(BertTimeoutError):
                bc.encode(["hello"])
        # Nothing listens on this host's own loopback: the server really is on the other host.
        with BertClient(ip="127.0.0.1", port=open_server.port, timeout=2) as bc:
            with pytest.raises(BertTimeoutError):
                bc.encode(["hello"])


# ---------------------------------------------------------------- scaling out: worker hosts join a head
#
# The head runs here with -num_worker 0 -worker_port; each worker host (`app.py -join`) runs in a
# network namespace of its own, joined to this one by a veth pair, so workers reach the head across
# a network interface. Without `ip netns` (not root), the worker hosts are processes on loopback.

VECTOR_FLAGS = ["-pooling_strategy", "REDUCE_MAX", "-pooling_layer", "-1", "-max_seq_len", "24",
                "-do_lower_case", "false", "-normalize", "true"]  # none the random model's defaults
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
HEAD_ARGS = ["-num_worker", "0", "-max_batch_size", "8", *VECTOR_FLAGS]
DETECTION = P.HEARTBEAT_INTERVAL * P.HEARTBEAT_LIVENESS  # seconds before the head gives a silent host up


def make_host(name: str, subnet: str) -> tuple[str, str]:
    """A network namespace `name` joined to this one by a veth pair; (namespace, this side's address)."""
    here, there = f"{name}h", f"{name}t"
    ip("netns", "add", name)
    ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
    ip("link", "add", here, "type", "veth", "peer", "name", there)
    ip("link", "set", there, "netns", name)
    ip("addr", "add", f"{subnet}.1/30", "dev", here)
    ip("link", "set", here, "up")
    ip("netns", "exec", name, "ip", "addr", "add", f"{subnet}.2/30", "dev", there)
    ip("netns", "exec", name, "ip", "link", "set", there, "up")
    return name, f"{subnet}.1"


@pytest.fixture(scope="module")
def hosts():
    """Two other hosts: [(namespace or None, the head's address as that host reaches it)]."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        yield [(None, "127.0.0.1"), (None, "127.0.0.1")]
        return
    tag = os.getpid() % 10000
    names = [f"bw{i}-{tag}" for i in range(2)]
    made = []
    try:
        for i, name in enumerate(names):
            made.append(make_host(name, f"10.{232 + i}.{tag % 250}"))
    except (subprocess.CalledProcessError, OSError):
        made = [(None, "127.0.0.1"), (None, "127.0.0.1")]  # no namespaces here: loopback instead
    try:
        yield made
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
            subprocess.run(["ip", "link", "del", f"{name}h"], capture_output=True, timeout=10)


class WorkerHostIn(RunningWorkerHost):
    """A worker host in a network namespace (None: this one)."""

    def __init__(self, namespace: str | None, head: str, args: list[str], **options) -> None:
        super().__init__(head, args, **options)
        self.namespace = namespace

    @property
    def command(self) -> list[str]:
        prefix = ["ip", "netns", "exec", self.namespace] if self.namespace else []
        return [*prefix, *super().command]


@pytest.fixture(scope="module")
def model_dirs(random_bert, tmp_path_factory):
    """The head's model folder, a copy of it elsewhere (same model), and another model."""
    folder = random_bert("remote_tiny", **TINY)[0]
    copy = tmp_path_factory.mktemp("worker_host") / "copy_of_the_model"
    shutil.copytree(folder, copy)
    other = random_bert("remote_other", seed=5, **TINY)[0]
    return folder, copy, other


@pytest.fixture(scope="module")
def reference(model_dirs):
    """The vectors a local server with the head's flags gives (one worker on this host)."""
    texts = real_sentences(120, seed=11)
    with RunningServer(["-model_dir", str(model_dirs[0]), *VECTOR_FLAGS]) as local:
        with BertClient(port=local.port, timeout=60) as bc:
            return dict(zip(texts, bc.encode(texts)))


@pytest.fixture(scope="module")
def head(model_dirs, hosts):
    """A head that only routes: its worker port on every interface, no key required."""
    worker_port = free_port()
    host = "127.0.0.1" if hosts[0][0] is None else "*"
    with RunningServer(["-model_dir", str(model_dirs[0]), "-host", host, "-worker_port", str(worker_port),
                        *HEAD_ARGS]) as server:
        server.worker_port = worker_port
        yield server


def worker_host(head: RunningServer, host: tuple[str | None, str], model_dir, *args: str,
                wait_ready: bool = True) -> WorkerHostIn:
    """A worker host (not started yet: `with` starts it) on `host` that joins `head`."""
    namespace, head_address = host
    return WorkerHostIn(namespace, f"tcp://{head_address}:{head.worker_port}", ["-model_dir", str(model_dir), *args],
                        wait_ready=wait_ready)


def head_status(head: RunningServer) -> dict:
    with BertClient(port=head.port, timeout=15) as bc:
        return bc.server_status()


def ready_workers(head: RunningServer, pid: int | None = None) -> list[dict]:
    return [w for w in head_status(head)["workers"] if w["ready"] and (pid is None or w["pid"] == pid)]


def worker_of(head: RunningServer, host: RunningWorkerHost) -> dict:
    """The head's status entry of the worker process of `host`, a child of its supervisor."""
    children = {int(p) for p in Path(f"/proc/{host.process.pid}/task/{host.process.pid}/children").read_text().split()}
    found = [w for w in head_status(head)["workers"] if w["pid"] in children]
    assert len(found) == 1, (children, head_status(head)["workers"])
    return found[0]


def assert_rows(vectors: np.ndarray, texts: list[str], reference: dict[str, np.ndarray]) -> None:
    np.testing.assert_allclose(vectors, np.stack([reference[t] for t in texts]), rtol=0, atol=1e-5)


def run_clients(head: RunningServer, reference: dict, n_clients: int, n_requests: int, seed: int) -> list:
    """Start `n_clients` threads, each sending `n_requests` requests and checking every vector;
    returns (threads, failures)."""
    pool = list(reference)
    failures: list = []

    def client(index: int) -> None:
        rng = random.Random(seed + index)
        try:
            with BertClient(port=head.port, timeout=90) as bc:
                for _ in range(n_requests):
                    batch = rng.sample(pool, rng.randint(10, 24))
                    assert_rows(bc.encode(batch), batch, reference)
        except Exception as e:  # asserted on by the caller
            failures.append(e)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n_clients)]
    for thread in threads:
        thread.start()
    return threads, failures


def join_all(threads: list, failures: list, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.1, deadline - time.monotonic()))
        assert not thread.is_alive(), "a client did not finish"
    assert not failures, failures[:3]


def test_a_routing_head_and_two_worker_hosts_give_a_local_servers_vectors(head, hosts, model_dirs, reference):
    folder, copy, _ = model_dirs
    # The vector flags come from the head: the hosts are given none, or another one, which is ignored.
    with worker_host(head, hosts[0], folder, "-max_seq_len", "99") as first, worker_host(head, hosts[1], copy):
        texts = list(reference)
        with BertClient(port=head.port, timeout=60) as bc:
            assert_rows(bc.encode(texts), texts, reference)  # 15 jobs of 8 over both hosts
            config = bc.server_config()
        workers = head_status(head)["workers"]
        assert len(workers) == 2 and all(w["ready"] and w["remote"] and w["jobs_done"] > 0 for w in workers), \
            (workers, head.log()[-4000:], first.log())
        assert {w["host"] for w in workers} == {socket.gethostname()} and all(w["device"] == "cpu" for w in workers)
        if hosts[0][0] is not None:  # each from its own network
            assert {w["address"] for w in workers} == {f"{h[1][:-2]}.2" for h in hosts}, workers
        assert config["pooling_strategy"] == "REDUCE_MAX" and config["max_seq_len"] == 24
        assert config["worker_port"] == head.worker_port and config["num_worker"] == 0
        assert "-max_seq_len ignored with -join: the head decides every option that changes a vector" in first.log()
    if hosts[0][0] is not None:
        assert "without -auth_dir: anyone who can reach it can join as a worker" in head.log()


def test_sigkill_of_a_worker_hosts_process_group_under_6_clients_loses_no_request(head, hosts, model_dirs, reference):
    folder = model_dirs[0]
    with worker_host(head, hosts[0], folder) as doomed, worker_host(head, hosts[1], folder):
        victim = worker_of(head, doomed)
        # Stopped first, so that jobs surely sit on the host when it dies: the head keeps sending it
        # jobs until it has as many as it asked for, then the whole host is killed.
        os.killpg(doomed.process.pid, signal.SIGSTOP)
        threads, failures = run_clients(head, reference, n_clients=6, n_requests=8, seed=100)
        given_up = rf"worker \S+/0 \(pid {victim['pid']}\) sent no heartbeat for [\d.]+ s; (\d+) jobs go back"
        wait_for(lambda: re.search(given_up, head.log()) or [
            w for w in head_status(head)["workers"] if w["pid"] == victim["pid"] and w["jobs_in_flight"] > 0],
            10, "jobs on the doomed host", interval=0.02)
        os.killpg(doomed.process.pid, signal.SIGKILL)
        join_all(threads, failures)
        found = re.search(given_up, head.log())
        assert found and int(found[1]) > 0, head.log()[-3000:]
        assert victim["pid"] not in [w["pid"] for w in head_status(head)["workers"]]
        doomed.stop()
    assert head_status(head)["errors"] == 0


def test_a_stopped_worker_host_has_its_jobs_resent_and_sigcont_brings_no_duplicate_reply(head, hosts, model_dirs,
                                                                                           reference):
    folder = model_dirs[0]
    texts = list(reference)
    with worker_host(head, hosts[0], folder) as hung, worker_host(head, hosts[1], folder):
        victim = worker_of(head, hung)
        before = head_status(head)
        os.killpg(hung.process.pid, signal.SIGSTOP)
        context = zmq.Context()
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"tcp://127.0.0.1:{head.port}")
        try:
            n = 12
            for request_id in range(1, n + 1):  # 12 requests of 10 sentences, in 2 jobs each
                dealer.send_multipart(pack_request(request_id, "encode", texts[request_id * 8:request_id * 8 + 10]))
            replies = {}
            deadline = time.monotonic() + 60
            while len(replies) < n and dealer.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                header, *buffers = dealer.recv_multipart()
                header = unpack_reply_header(header)
                assert header["id"] not in replies, f"a second reply to request {header['id']}"
                replies[header["id"]] = unpack_vectors(header, buffers)
            assert sorted(replies) == list(range(1, n + 1))
            for request_id, vectors in replies.items():
                assert_rows(vectors, texts[request_id * 8:request_id * 8 + 10], reference)
            found = re.search(rf"worker \S+/0 \(pid {victim['pid']}\) sent no heartbeat for [\d.]+ s; (\d+) jobs go back",
                              head.log())
            assert found and int(found[1]) > 0, head.log()[-3000:]
            # Woken up, the host finishes the jobs it held and sends them to a head that gave it up:
            # ignored, and told STOP, it joins again.
            os.killpg(hung.process.pid, signal.SIGCONT)
            wait_for(lambda: hung.log().count("joined the head at") == 2, 30, f"the host to join again\n{hung.log()}")
            assert not dealer.poll(1000), f"an extra reply: {dealer.recv_multipart()[:1]}"
        finally:
            dealer.close(linger=0)
            context.term()
        after = head_status(head)
        assert after["requests"] - before["requests"] == n and after["errors"] == before["errors"], after
        with BertClient(port=head.port, timeout=30) as bc:
            assert_rows(bc.encode(texts[:40]), texts[:40], reference)
        assert len(ready_workers(head)) == 2


def test_a_worker_that_dies_on_its_host_is_restarted_there_and_counted_by_the_head(head, hosts, model_dirs, reference):
    with worker_host(head, hosts[0], model_dirs[0]) as host:
        first = worker_of(head, host)
        assert first["restarts"] == 0 and first["host"] == socket.gethostname()
        os.kill(first["pid"], signal.SIGKILL)
        wait_for(lambda: host.log().count("joined the head at") == 2, 60, f"the replacement to join\n{host.log()}")
        assert f"worker 0 (pid {first['pid']}) exited with code -9; restarting it" in host.log()
        # The host logs "joined" as it sends READY; the head reads it a moment later (a race under load).
        wait_for(lambda: worker_of(head, host)["ready"], 30, "the head to take the replacement's READY")
        second = worker_of(head, host)
        assert second["pid"] != first["pid"] and second["restarts"] == 1 and second["ready"], second
        texts = list(reference)[:16]
        with BertClient(port=head.port, timeout=30) as bc:
            assert_rows(bc.encode(texts), texts, reference)


def test_worker_hosts_wait_for_a_head_started_later_and_rejoin_a_restarted_one(hosts, model_dirs, reference):
    folder = model_dirs[0]
    port, worker_port = free_port(), free_port()
    host = "127.0.0.1" if hosts[0][0] is None else "*"
    args = ["-model_dir", str(folder), "-host", host, "-worker_port", str(worker_port), *HEAD_ARGS]
    texts = list(reference)[:30]
    first_head = RunningServer(args, port=port)
    first_head.worker_port = worker_port
    # Started before any head: it waits.
    early = worker_host(first_head, hosts[0], folder, wait_ready=False).start()
    try:
        wait_for(lambda: "no answer from the head at" in early.log(), 30, f"the host to wait\n{early.log()}")
        with first_head:
            early.wait_until_ready()
            with BertClient(port=port, timeout=30) as bc:
                assert_rows(bc.encode(texts), texts, reference)
            first_head.stop(signal.SIGKILL)  # no goodbye: the hosts find out by themselves
        second_head = RunningServer(args, port=port)
        second_head.worker_port = worker_port
        with second_head:
            wait_for(lambda: early.log().count("joined the head at") == 2, 60, f"a rejoin\n{early.log()}")
            with BertClient(port=port, timeout=30) as bc:
                assert_rows(bc.encode(texts), texts, reference)
            assert "starts again to load the model" not in early.log()  # the same options: no reload
            assert len(ready_workers(second_head)) == 1
    finally:
        early.stop()


def test_a_worker_host_with_another_model_is_refused_and_exits_naming_the_mismatch(head, hosts, model_dirs):
    other = worker_host(head, hosts[1], model_dirs[2], wait_ready=False).start()
    try:
        code = other.process.wait(timeout=120)
        assert code != 0
        assert re.search(r"refused worker 0: model mismatch: .* differs from the head's in its weights", other.log()), \
            other.log()
        assert "refused a worker of host" in head.log()
    finally:
        other.stop()


def test_with_auth_dir_a_worker_without_keys_is_refused_and_given_no_job(tmp_path, hosts, model_dirs, reference):
    folder = model_dirs[0]
    keys = tmp_path / "keys"
    stranger = tmp_path / "stranger"  # the head's public key, but a worker key the head never allowed
    for folder_, extra in ((keys, ["-client_name", "client"]), (keys, ["-worker_name", "gpu1"]),
                           (stranger, ["-worker_name", "gpu1"])):
        done = subprocess.run([sys.executable, str(ROOT / "app.py"), "-keygen", str(folder_), *extra],
                              capture_output=True, timeout=60, text=True)
        assert done.returncode == 0, done.stderr
    assert (keys / "workers" / "gpu1.key").is_file() and (keys / "workers" / "gpu1.key_secret").is_file()
    shutil.copy(keys / "server.key", stranger / "server.key")
    worker_port = free_port()
    host = "127.0.0.1" if hosts[0][0] is None else "*"
    client_keys = dict(server_public_key=str(keys / "server.key"), client_key=str(keys / "client.key_secret"))
    with RunningServer(["-model_dir", str(folder), "-host", host, "-worker_port", str(worker_port),
                        "-auth_dir", str(keys), *HEAD_ARGS]) as secured:
        secured.worker_port = worker_port
        assert "without -auth_dir" not in secured.log()
        keyless = worker_host(secured, hosts[0], folder, wait_ready=False).start()
        unknown = worker_host(secured, hosts[0], folder, "-auth_dir", str(stranger), "-worker_name", "gpu1",
                              wait_ready=False).start()
        try:
            wait_for(lambda: "refused a worker connection: its CurveZMQ handshake failed" in secured.log(), 60,
                     f"a refusal\n{secured.log()}")
            wait_for(lambda: "handshake failed (HANDSHAKE_FAILED_AUTH)" in secured.log(), 60, f"a refusal\n{secured.log()}")
            with BertClient(port=secured.port, timeout=3, **client_keys) as bc:
                with pytest.raises(BertTimeoutError):
                    bc.encode(["nobody may compute this"])
                state = bc.server_status()
            assert state["workers"] == [] and state["workers_ready"] == 0
            assert "no worker host has joined" in state["not_ready_because"]
            assert "joined the head at" not in keyless.log() + unknown.log()
            with worker_host(secured, hosts[1], folder, "-auth_dir", str(keys), "-worker_name", "gpu1"):
                texts = list(reference)[:20]
                with BertClient(port=secured.port, timeout=30, **client_keys) as bc:
                    assert_rows(bc.encode(texts), texts, reference)
                    assert bc.server_status()["workers_ready"] == 1
            assert "joined the head at" not in keyless.log() + unknown.log()
            # Nor does a worker's key open the client port.
            with BertClient(port=secured.port, timeout=3, server_public_key=str(keys / "server.key"),
                            client_key=str(keys / "workers" / "gpu1.key_secret")) as bc:
                with pytest.raises(BertTimeoutError):
                    bc.server_status()
            assert "a head with -auth_dir answers only workers started with -auth_dir" in keyless.log()
        finally:
            keyless.stop()
            unknown.stop()


def test_num_worker_0_needs_a_worker_port_and_join_excludes_head_flags(capsys):
    from app import build_parser, config_from_args

    with pytest.raises(SystemExit):
        build_parser().parse_args(["-num_worker", "0"])
    assert "argument -num_worker: must be at least 1, got 0 (0 only with -worker_port" in capsys.readouterr().err
    assert config_from_args(build_parser().parse_args(["-num_worker", "0", "-worker_port", "5556"])).num_worker == 0
    with pytest.raises(ValueError, match="0 only with -worker_port"):
        ServerConfig(num_worker=0)
    with pytest.raises(ValueError, match="exclude each other"):
        config_from_args(build_parser().parse_args(["-join", "tcp://h:5556", "-worker_port", "5556"]))
    with pytest.raises(ValueError, match="-join takes tcp://HEAD:PORT"):
        config_from_args(build_parser().parse_args(["-join", "h:5556"]))
    with pytest.raises(ValueError, match="serves no clients"):
        config_from_args(build_parser().parse_args(["-join", "tcp://h:5556", "-http_port", "8080"]))


def test_a_worker_of_an_older_protocol_is_refused_by_name_and_the_head_serves_on(model_dirs):
    # Protocol 2 changed the JOB and RESULT headers: a worker host of an older release must hear why
    # it is turned away rather than join and misread its jobs.
    worker_port = free_port()
    args = ["-model_dir", str(model_dirs[0]), "-worker_port", str(worker_port), *HEAD_ARGS]
    with RunningServer(args) as head:
        context = zmq.Context()
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            dealer.connect(f"tcp://127.0.0.1:{worker_port}")
            hello = {"protocol": 1, "pid": os.getpid(), "host": "old-release", "index": 0, "restarts": 0}
            dealer.send_multipart([P.HELLO, P.dumps(hello)])
            assert dealer.poll(15_000), "no answer to HELLO"
            command, body = dealer.recv_multipart()
            assert command == P.REFUSED, command
            assert P.loads(body)["message"] == f"worker protocol 1: this head speaks {P.REMOTE_PROTOCOL}"
        finally:
            dealer.close(linger=0)
            context.term()
        assert wait_for(lambda: "refused a worker of host 'old-release'" in head.log(), 10, head.log())
        assert head_status(head)["workers"] == []

"""Edges (issue 8, items 5 to 8), each against a real `python app.py` on 127.0.0.1 with a tiny random
BERT: a huge sentence costs a worker no more memory than a normal one; a client's timeouts against a
dead port never block and are never delivered later; a worker whose tokenize or compute thread dies,
or whose work stalls, is replaced and its jobs answered by the next one (faults armed through
$BERT_SERVING_FAULT_DIR, the server's documented fault injection); `-keygen` never replaces a key
and refuses the name `server`; refused unauthenticated connections are logged, rate-limited.
"""
from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import raw_dealer, real_sentences
from service.client import BertClient, BertTimeoutError
from service.harness import ROOT, RunningServer, free_port, rss_kb, wait_for

ATOL = 1e-5
STALL_TIMEOUT = 3  # seconds; the tiny model's windows take milliseconds, even on a loaded machine
MB = 1024 * 1024


def status(port: int) -> dict:
    with BertClient(port=port, timeout=15) as client:
        return client.server_status()


def ready_worker(server: RunningServer, restarts: int) -> dict:
    """The one worker, once ready after `restarts` restarts."""
    return wait_for(lambda: (w := status(server.port)["workers"][0])["ready"] and w["restarts"] == restarts and w,
                    90, f"the worker ready after {restarts} restarts\n{server.log()[-3000:]}", interval=0.25)


def peak_rss_kb(pid: int) -> int:
    """The highest resident memory the process has had (VmHWM), in kB."""
    found = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert found, pid
    return int(found[1])


def keygen(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "app.py"), "-keygen", str(folder), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------- a huge sentence (item 5)


def test_a_10_mb_sentence_costs_the_worker_no_memory_and_gets_the_vector_of_its_start(tiny_dir, tiny_encoder):
    words = "the quick brown fox jumps over the lazy dog "
    huge = words * (10 * MB // len(words))
    with RunningServer(["-model_dir", str(tiny_dir)]) as server, \
            BertClient(port=server.port, timeout=120) as client:
        client.encode(["warm up", words * 50])
        pid = client.server_status()["workers"][0]["pid"]
        before = rss_kb(pid)
        vectors = client.encode([huge, "a normal sentence"])
        peak = peak_rss_kb(pid)
        state = client.server_status()
    # Only max_seq_len tokens of it are used, so its vector is that of any long enough start of it.
    np.testing.assert_allclose(vectors, tiny_encoder.encode([huge[:20_000], "a normal sentence"]), atol=ATOL)
    assert state["workers"][0]["restarts"] == 0, state
    assert peak - before < 100 * 1024, f"worker RSS {before} kB before, peak {peak} kB with a 10 MB sentence"


# ---------------------------------------------------------------- a dead server (item 6)


def test_timeouts_to_a_dead_port_never_block_and_are_never_delivered_to_the_server_that_comes(tiny_dir,
                                                                                                tiny_encoder):
    port = free_port()  # nothing listens here yet
    client = BertClient(ip="127.0.0.1", port=port, timeout=0.005)
    outcomes: list = []

    def call_dead_port() -> None:
        for _ in range(1000):
            try:
                client.encode(["stale"])
                outcomes.append("answered")
            except BertTimeoutError:
                outcomes.append("timeout")

    try:
        caller = threading.Thread(target=call_dead_port, daemon=True)
        caller.start()
        caller.join(240)  # 1,000 x 5 ms and a socket each; a send that blocked would never end
        assert not caller.is_alive(), f"blocked after {len(outcomes)} calls"
        assert outcomes == ["timeout"] * 1000
        with RunningServer(["-model_dir", str(tiny_dir)], port=port):
            client.timeout = 60
            np.testing.assert_allclose(client.encode(["fresh"]), tiny_encoder.encode(["fresh"]), atol=ATOL)
            state = client.server_status()
    finally:
        client.close()
    # The one request computed is the fresh one: none of the 1,000 stale ones reached the server.
    assert state["requests"] == 1 and state["sentences"] == 1, state
    assert state["timeouts_dropped"] == 0 and state["errors"] == 0 and state["bad_requests"] == 0, state
    assert state["workers"][0]["jobs_done"] == 1, state


def test_a_timeout_in_encode_async_abandons_what_is_in_flight_and_the_next_call_gets_its_own_reply(
        fault_server, tiny_encoder):
    """The worker is paused, so no reply can come in time on any machine; once it runs again, the
    replies to the abandoned requests go to the old connection and are never read."""
    worker = ready_worker(fault_server, status(fault_server.port)["workers"][0]["restarts"])
    batches = [[f"async {i} {j}" for j in range(3)] for i in range(6)]
    with BertClient(port=fault_server.port, timeout=0.5) as client:
        os.kill(worker["pid"], signal.SIGSTOP)
        try:
            with pytest.raises(BertTimeoutError):
                list(client.encode_async(batches, max_in_flight=4))
        finally:
            os.kill(worker["pid"], signal.SIGCONT)
        assert client._early == {}
        client.timeout = 60
        texts = ["after the timeout", "its own reply"]
        np.testing.assert_allclose(client.encode(texts), tiny_encoder.encode(texts), atol=ATOL)
        assert [len(r) for r in client.encode_async(batches[:2])] == [3, 3]
        assert client._early == {}


def test_a_call_that_times_out_inside_encode_async_abandons_the_loop_which_says_so_at_once(
        fault_server, tiny_encoder):
    """An encode() inside the loop times out (the worker is paused): the loop's requests went with
    the old connection, so its next result raises at once, not after another wait."""
    worker = ready_worker(fault_server, status(fault_server.port)["workers"][0]["restarts"])
    batches = [[f"loop {i} {j}" for j in range(3)] for i in range(6)]
    with BertClient(port=fault_server.port, timeout=60) as client:
        loop = client.encode_async(batches, max_in_flight=3)
        np.testing.assert_allclose(next(loop), tiny_encoder.encode(batches[0]), atol=ATOL)
        os.kill(worker["pid"], signal.SIGSTOP)
        try:
            client.timeout = 0.5
            with pytest.raises(BertTimeoutError, match="no reply"):
                client.encode(["inside the loop"])
        finally:
            os.kill(worker["pid"], signal.SIGCONT)
        client.timeout = 60
        with pytest.raises(BertTimeoutError, match="abandoned when another request on this client timed out"):
            next(loop)
        assert client._early == {} and client._outstanding == set()
        texts = ["after the loop", "its own reply"]
        np.testing.assert_allclose(client.encode(texts), tiny_encoder.encode(texts), atol=ATOL)


# ---------------------------------------------------------------- a worker's stage dies or stalls (item 7)


@pytest.fixture(scope="module")
def fault_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def fault_server(tiny_dir, fault_dir):
    with RunningServer(["-model_dir", str(tiny_dir), "-stall_timeout", str(STALL_TIMEOUT)],
                       env={"BERT_SERVING_FAULT_DIR": str(fault_dir)}) as server:
        yield server


FAULTS = {  # armed file: what the broker's log says about the worker
    "tokenize": r"exited with code 71",
    "compute": r"exited with code 71",
    "stall": r"sent no heartbeat for [\d.]+ s",
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_worker_whose_stage_dies_or_stalls_is_replaced_and_its_jobs_answered(fault, fault_server, fault_dir,
                                                                              tiny_encoder):
    assert "fault injection is on" in fault_server.log()
    restarts = status(fault_server.port)["workers"][0]["restarts"]
    victim = ready_worker(fault_server, restarts)
    (fault_dir / fault).touch()
    texts = [f"sentence {i} for the {fault} fault" for i in range(12)]
    with BertClient(port=fault_server.port, timeout=120) as client:
        vectors = client.encode(texts)
    np.testing.assert_allclose(vectors, tiny_encoder.encode(texts), atol=ATOL)
    assert not (fault_dir / fault).exists()  # tripped once, by the first worker
    log = fault_server.log()
    assert re.search(rf"worker 0 \(pid {victim['pid']}\) {FAULTS[fault]}; 1 jobs go back to the queue", log), \
        log[-3000:]
    if fault == "stall":
        assert re.search(r"no progress on 1 jobs for \d+ s \(-stall_timeout 3\)", log), log[-3000:]
    else:
        assert f"the {fault} thread died (InjectedFault" in log, log[-3000:]
    replacement = ready_worker(fault_server, restarts + 1)
    assert replacement["pid"] != victim["pid"] and replacement["jobs_done"] == victim["jobs_done"] + 1, replacement


def test_a_window_of_many_passes_longer_than_the_stall_timeout_is_not_a_stall(bundled_encoder):
    """-stall_timeout is time in which no job moves on and no forward pass finishes, not the length
    of a window: one request in one-sentence passes (-max_batch_tokens 16), seconds of work here
    for a worker allowed 1 s, is answered by the worker that took it, which is never taken for stalled."""
    texts = real_sentences(600, seed=11)
    with RunningServer(["-num_worker", "1", "-stall_timeout", "1", "-max_batch_tokens", "16"]) as server, \
            BertClient(port=server.port, timeout=300) as client:
        started = time.monotonic()
        vectors = client.encode(texts)
        took = time.monotonic() - started
        (worker,) = status(server.port)["workers"]
        log = server.log()
    np.testing.assert_allclose(vectors, bundled_encoder.encode(texts), rtol=0, atol=ATOL)
    assert "no progress" not in log and "sent no heartbeat" not in log, f"{took:.1f} s\n{log[-3000:]}"
    assert worker["restarts"] == 0 and worker["jobs_done"] == 3, worker  # 600 sentences: jobs of 256


# ---------------------------------------------------------------- keys (item 8)


def test_keygen_never_replaces_a_key_refuses_the_name_server_and_keeps_secrets_private(tmp_path):
    keys = tmp_path / "keys"
    assert keygen(keys).returncode == 0
    files = ["server.key", "server.key_secret", "client.key_secret", "clients/client.key"]
    made = {name: (keys / name).read_bytes() for name in files}
    for secret in ("server.key_secret", "client.key_secret"):
        assert stat.S_IMODE((keys / secret).stat().st_mode) == 0o600, secret

    again = keygen(keys)
    assert again.returncode == 1 and "client.key_secret exists: -keygen never replaces a key" in again.stderr, again
    server = keygen(keys, "-client_name", "server")
    assert server.returncode == 1 and "'server' is reserved for the server's own key pair" in server.stderr, server
    path = keygen(keys, "-client_name", "../escape")
    assert path.returncode == 1 and "must be 1 to 64 letters" in path.stderr, path
    assert {name: (keys / name).read_bytes() for name in files} == made  # nothing was replaced

    alice = keygen(keys, "-client_name", "alice")
    assert alice.returncode == 0, alice.stderr
    assert stat.S_IMODE((keys / "alice.key_secret").stat().st_mode) == 0o600
    assert (keys / "clients" / "alice.key").is_file()
    assert {name: (keys / name).read_bytes() for name in files} == made  # the server's pair is reused
    assert sorted(p.name for p in keys.iterdir()) == ["alice.key_secret", "client.key_secret", "clients",
                                                     "server.key", "server.key_secret"]


def test_refused_unauthenticated_connections_are_logged_rate_limited(tmp_path, tiny_dir, tiny_encoder):
    keys, other = tmp_path / "keys", tmp_path / "other"
    assert keygen(keys).returncode == 0 and keygen(other, "-client_name", "intruder").returncode == 0
    with RunningServer(["-model_dir", str(tiny_dir), "-auth_dir", str(keys)]) as server:
        strangers = [BertClient(port=server.port, timeout=1),  # no keys: retries the handshake every 100 ms
                     BertClient(port=server.port, timeout=1, server_public_key=str(keys / "server.key"),
                                client_key=str(other / "intruder.key_secret"))]
        try:
            for stranger in strangers:
                with pytest.raises(BertTimeoutError):
                    stranger.encode(["let me in"])
            found = wait_for(lambda: re.search(r"refused (\d+) unauthenticated connection attempts? on the client "
                                               r"port \(last: ([^)]+)\)", server.log()), 15, "a refusal logged")
        finally:
            for stranger in strangers:
                stranger.close()
        with BertClient(port=server.port, timeout=30, server_public_key=str(keys / "server.key"),
                        client_key=str(keys / "client.key_secret")) as friend:
            np.testing.assert_allclose(friend.encode(["welcome"]), tiny_encoder.encode(["welcome"]), atol=ATOL)
        assert server.stop() == 0
        log = server.log()
    assert int(found[1]) >= 1, found[0]
    # The first line may come from a handshake the client cut short (no cause given); the last one
    # names the cause seen: no keys, or a key not allowed.
    reasons = re.findall(r"refused \d+ unauthenticated connection attempts? on the client port \(last: ([^)]+)\)", log)
    assert "without CurveZMQ keys" in reasons[-1] or "not allowed" in reasons[-1], reasons
    # Each refused client retried its handshake every 100 ms or so: many refusals, two lines (the first
    # at once, the rest counted at shutdown, within the 60 s between two lines).
    lines = re.findall(r"refused \d+ unauthenticated connection attempts?.*; (\d+) since start", log)
    assert len(lines) == 2 and int(lines[-1]) > 2, log[-3000:]


# ---------------------------------------------------------------- floods of refused requests


def test_a_flood_of_bad_or_refused_requests_logs_a_line_per_interval_and_the_server_serves_on(tiny_dir,
                                                                                             tiny_encoder):
    """3,000 two-byte messages, then 1,000 requests past -max_client_requests while the worker is
    paused: each is answered and counted, and the log gets at most a line per 10 s of each kind."""
    with RunningServer(["-model_dir", str(tiny_dir), "-max_client_requests", "4"]) as server:
        worker = ready_worker(server, 0)
        started = time.monotonic()
        with raw_dealer(server.port, RCVTIMEO=30_000) as dealer:  # a missing reply raises, never hangs
            for _ in range(3000):
                dealer.send_multipart([b"{}"])
            errors = [json.loads(dealer.recv_multipart()[0])["error"] for _ in range(3000)]
            assert set(errors) == {"bad_request"}, set(errors)
            os.kill(worker["pid"], signal.SIGSTOP)
            try:
                for i in range(1000):
                    dealer.send_multipart([json.dumps({"v": 1, "id": i, "cmd": "encode"}).encode(),
                                           json.dumps([f"flood {i}"]).encode()])
                refused = [json.loads(dealer.recv_multipart()[0]) for _ in range(996)]
            finally:
                os.kill(worker["pid"], signal.SIGCONT)
            served = [json.loads(dealer.recv_multipart()[0]) for _ in range(4)]
        assert all(r["error"] == "busy" for r in refused) and all(r["ok"] for r in served), (refused[:1], served)
        with BertClient(port=server.port, timeout=60) as client:
            np.testing.assert_allclose(client.encode(["after the flood"]), tiny_encoder.encode(["after the flood"]),
                                       atol=ATOL)
        state, log = status(server.port), server.log()
    assert state["bad_requests"] == 3000 and state["busy"] == 996, state
    bound = 2 + (time.monotonic() - started) / 10  # the first line, then one per 10 s at most
    assert log.count("bad request from") <= bound and log.count("busy: refused") <= bound, log[-3000:]
    assert len(log) < 50_000, len(log)  # a line per message would be over 300 KB

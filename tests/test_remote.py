"""A client on another host: the server runs in its own network namespace, joined to this one by a
veth pair, so requests cross a network interface rather than loopback (root and iproute2 needed;
skipped otherwise)."""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

from helpers import real_sentences
from service.harness import RunningServer
from service.client import BertClient, BertTimeoutError


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

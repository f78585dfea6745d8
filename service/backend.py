"""Who may be a worker: the checks the broker applies to its back ends' peers.

Local workers link to the broker over a Unix socket in its 0700 runtime folder (`service/link.py`);
the broker takes a link only from the pid of a process it spawned, as the kernel reports the peer
(SO_PEERCRED), and their READY must carry that pid too. Any other connection (a process of the same
user that found the socket) is closed, and logged at a bounded rate so a flood of them cannot flood
the log.

Workers of other hosts join a head's worker port (`-worker_port`, TCP, CurveZMQ with its own
allow-list under `-auth_dir`): the head takes them only with the same model (a fingerprint of its
configuration, vocabulary and weights) and hands them every option that changes a vector.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from bert.checkpoint import ModelFolder, inspect_folder

from . import protocol as P
from .config import ServerConfig
from .errors import StartupError
from .logs import LogLimiter

log = logging.getLogger(__name__)



def ready_is_from_spawned(info: Any, spawned_pid: int | None) -> bool:
    """True when a READY's payload names the pid of the process the broker spawned for this identity."""
    return isinstance(info, dict) and spawned_pid is not None and info.get("pid") == spawned_pid


CPU_JOBS_WANTED = 2  # one computing, one tokenized behind it: the CPU keeps busy with no more


def jobs_wanted(device: str) -> int:
    """The jobs a worker asks to hold at once (READY's capacity): a GPU finishes a merged window so
    fast that it wants more queued behind it. A CPU takes seconds per job of 256 sentences, and a
    small request dispatched to it waits for every job already in hand: measured behind a
    200,000-sentence flood (bundled model, 2 cores), 4 jobs in hand gave the small client p50 3.2 s
    and p99 6.6 s, 2 gave 1.6 s and 2.9 s, with the same throughput (cpu_bar)."""
    return P.WORKER_PREFETCH_JOBS * 2 if device.startswith("cuda") else CPU_JOBS_WANTED


def capacity_of(info: dict) -> int:
    """READY's capacity, cut to [1, MAX_WORKER_CAPACITY]; the default for a worker that sends none."""
    wanted = info.get("capacity")
    if not isinstance(wanted, int) or isinstance(wanted, bool):
        return P.WORKER_PREFETCH_JOBS
    return max(1, min(P.MAX_WORKER_CAPACITY, wanted))


# ---------------------------------------------------------------- workers of other hosts

FINGERPRINT_PARTS = ("config", "vocab", "weights")
VOCAB_FILES = ("vocab.txt", "tokenizer.json")


def largest_result_bytes(folder: ModelFolder, config: ServerConfig) -> int:
    """The largest frame a worker sends: per-token vectors of every pooled layer for a full
    mini-batch at the longest sequence, in float32, and room for its tokens in the header."""
    layers = len(config.encoder.pooling_layer or (-1,))
    longest = folder.config.max_position_embeddings  # -max_seq_len cannot pass it
    vectors = config.max_batch_size * longest * folder.config.hidden_size * layers * 4
    return vectors + config.max_batch_size * longest * 64 + (1 << 20)


def model_fingerprint(folder: ModelFolder) -> dict[str, str]:
    """sha256 of each part of a model that decides its vectors: the configuration (the model's and
    the folder's own defaults), the vocabulary files and the weight files. Paths are left out, so a
    copy of the same model elsewhere has the same fingerprint."""
    from bert.checkpoint import weight_files

    settings = {"kind": folder.kind, "config": dataclasses.asdict(folder.config),
                "pooling": dataclasses.asdict(folder.pooling), "max_seq_len": folder.max_seq_len,
                "do_lower_case": folder.do_lower_case, "lowercase_input": folder.lowercase_input}
    config = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    vocab = _hash_files([folder.weights_dir / name for name in VOCAB_FILES if (folder.weights_dir / name).is_file()])
    return {"config": config, "vocab": vocab, "weights": _hash_files(weight_files(folder))}


def _hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def fingerprint_mismatch(ours: dict[str, str], theirs: Any) -> str | None:
    """Why a worker's model is not the head's, or None when it is the same."""
    if not isinstance(theirs, dict):
        return "the worker sent no model fingerprint"
    differ = [part for part in FINGERPRINT_PARTS if theirs.get(part) != ours[part]]
    if not differ:
        return None
    detail = ", ".join(f"{part} {str(theirs.get(part))[:12]} here, {ours[part][:12]} on the head" for part in differ)
    return f"model mismatch: the worker's model differs from the head's in its {' and '.join(differ)} ({detail})"


def welcome_options(config: ServerConfig) -> dict:
    """Every option that changes a vector, as the head runs with them (None: the folder's own, the
    same on both sides since the fingerprints match)."""
    e = config.encoder
    return {"encoder": {"pooling_strategy": e.pooling_strategy,
                        "pooling_layer": list(e.pooling_layer) if e.pooling_layer is not None else None,
                        "mask_cls_sep": e.mask_cls_sep, "normalize": e.normalize, "max_seq_len": e.max_seq_len,
                        "do_lower_case": e.do_lower_case, "dtype": e.dtype},
            "output_dtype": config.output_dtype}


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


class WorkerPort:
    """The head's worker port: a ROUTER on `-host:-worker_port` that workers of other hosts join."""

    def __init__(self, context: zmq.Context, config: ServerConfig, authenticator: Any) -> None:
        self.config = config
        self.watcher: WorkerPortRefusals | None = None
        self.refusals = LogLimiter(log)  # HELLOs refused (another model...), one line per 10 s at most
        folder = inspect_folder(config.encoder.model_dir)
        self.fingerprint = model_fingerprint(folder)
        self.welcome = welcome_options(config)
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        # No frame over what a worker can rightly send: without -auth_dir anyone may connect here.
        self.socket.setsockopt(zmq.MAXMSGSIZE, largest_result_bytes(folder, config))
        if authenticator is not None:
            self.require_keys(authenticator)
        elif not is_loopback(config.host):
            log.warning("-worker_port %d on %s without -auth_dir: anyone who can reach it can join as a worker, "
                        "read clients' sentences and answer with wrong vectors; use -auth_dir (and -keygen DIR "
                        "-worker_name NAME) unless the network is yours alone", config.worker_port, config.host)
        else:
            log.warning("-worker_port %d on loopback without -auth_dir: any local user can join as a worker; "
                        "use -auth_dir unless this machine is yours alone", config.worker_port)
        self.address = f"tcp://{config.host}:{config.worker_port}"
        try:
            self.socket.bind(self.address)
        except zmq.ZMQError as e:
            raise StartupError(f"cannot listen for workers on {self.address}: {e}") from None
        log.info("workers of other hosts join on %s (model fingerprint %s)", self.address,
                 "/".join(v[:8] for v in self.fingerprint.values()))

    def require_keys(self, authenticator: Any) -> None:
        from .auth import server_key_paths

        folder = Path(self.config.auth_dir) / "workers"
        if not folder.is_dir() or not any(folder.glob("*.key")):
            raise StartupError(f"{folder}: no allowed worker keys (*.key); create one with: "
                               f"python app.py -keygen {self.config.auth_dir} -worker_name NAME")
        # Certificates, not a callback: pyzmq's authenticator asks callbacks for every domain once one
        # is set, which would lock the clients out.
        zap = getattr(authenticator, "authenticator", authenticator)  # the ThreadAuthenticator, if wrapped
        zap.configure_curve(domain=WORKER_ZAP_DOMAIN, location=str(folder))
        self.watcher = WorkerPortRefusals(self.socket)
        public, secret = zmq.auth.load_certificate(str(server_key_paths(self.config.auth_dir)[1]))
        self.socket.zap_domain = WORKER_ZAP_DOMAIN.encode()
        self.socket.curve_secretkey, self.socket.curve_publickey, self.socket.curve_server = secret, public, True
        log.info("CurveZMQ on the worker port: %d allowed worker keys in %s", len(list(folder.glob("*.key"))), folder)

    def answer_hello(self, hello: Any) -> tuple[bytes, dict]:
        """(WELCOME, the options) for a worker that may join, else (REFUSED, why)."""
        if not isinstance(hello, dict) or hello.get("protocol") != P.REMOTE_PROTOCOL:
            version = hello.get("protocol") if isinstance(hello, dict) else None
            return P.REFUSED, {"message": f"worker protocol {version!r}: this head speaks {P.REMOTE_PROTOCOL}"}
        mismatch = fingerprint_mismatch(self.fingerprint, hello.get("fingerprint"))
        if mismatch:
            return P.REFUSED, {"message": mismatch}
        return P.WELCOME, self.welcome

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.socket.close(linger=0)


class WorkerPortRefusals:
    """Logs connections to the worker port whose CurveZMQ handshake failed (a worker without keys,
    with the wrong server key, or with a key not allowed), at a bounded rate. Its own thread owns
    the monitor socket."""

    EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
              | zmq.EVENT_HANDSHAKE_FAILED_AUTH)

    def __init__(self, socket: zmq.Socket) -> None:
        self.socket = socket
        self.monitor = socket.get_monitor_socket(self.EVENTS)
        self.refusals = {event: LogLimiter(log) for event in zmq.Event if event & self.EVENTS}  # one per reason
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch, name="worker-port-handshakes", daemon=True)
        self.thread.start()

    def watch(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while not self.done.is_set():
            if not self.monitor.poll(200):
                continue
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.ZMQError:
                continue
            kind = zmq.Event(event["event"])
            self.refusals[kind].warning("refused a worker connection: its CurveZMQ handshake failed (%s); a worker "
                                        "host needs -auth_dir with server.key and workers/NAME.key_secret", kind.name)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=2)
        self.socket.disable_monitor()
        self.monitor.close(linger=0)


WORKER_ZAP_DOMAIN = "workers"  # the ZAP domain of the worker port: worker keys, never client keys

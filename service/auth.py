"""CurveZMQ authentication: key pairs, the server side of the allow-list, and a log of refusals.

Layout of an auth folder (made by `python app.py -keygen DIR`):

    DIR/server.key, DIR/server.key_secret      the server's key pair (give clients server.key)
    DIR/clients/NAME.key                        public keys of the clients allowed in
    DIR/NAME.key_secret                         a client's key pair (give it to that client only)
    DIR/workers/NAME.key, NAME.key_secret       a worker host's pair (`-keygen DIR -worker_name NAME`);
                                                the *.key files are the worker port's allow-list

`-keygen` never replaces a key file: a name already used is refused with an error, and so is the
name `server`. Secret key files are written with mode 0600.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)

RESERVED_NAMES = ("server",)  # DIR/server.key(_secret) is the server's own pair
CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a file name, never a path
REFUSALS_LOG_INTERVAL = 60.0  # seconds between two lines about refused connections (one per client retry otherwise)
HANDSHAKE_FAILURES = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | \
    zmq.EVENT_HANDSHAKE_FAILED_AUTH


class KeygenError(ValueError):
    """-keygen cannot make the keys asked for; the message says why and what to do."""


def server_key_paths(auth_dir: str | Path) -> tuple[Path, Path]:
    folder = Path(auth_dir)
    return folder / "server.key", folder / "server.key_secret"


def check_client_name(name: str) -> None:
    """Refuse a -client_name that would clash with the server's keys or is not a plain file name."""
    if name.lower() in RESERVED_NAMES:
        raise KeygenError(f"-client_name {name!r} is reserved for the server's own key pair; choose another name")
    check_key_name(name, "-client_name")


def check_key_name(name: str, flag: str) -> None:
    """Refuse a key pair's name that is not a plain file name."""
    if not CLIENT_NAME.fullmatch(name):
        raise KeygenError(f"{flag} {name!r} must be 1 to 64 letters, digits, '_', '-' or '.', "
                          "starting with a letter or digit")


def make_keys(auth_dir: str | Path, client_name: str = "client") -> dict[str, Path]:
    """Create the server's key pair (once) and a key pair for `client_name`, allowed in at once.
    Raise KeygenError rather than replace any key file that exists."""
    check_client_name(client_name)
    folder = Path(auth_dir)
    clients = folder / "clients"
    clients.mkdir(parents=True, exist_ok=True)
    public, secret = server_key_paths(folder)
    client_secret, allowed = folder / f"{client_name}.key_secret", clients / f"{client_name}.key"
    _make_pair(folder, client_name, client_secret, allowed,
               f"To make a new pair for '{client_name}', remove {client_secret} and {allowed} first; or choose "
               "another -client_name")
    return {"server_public": public, "server_secret": secret, "client_public": allowed,
            "client_secret": client_secret}


def _make_pair(folder: Path, name: str, secret_path: Path, public_path: Path, replace_hint: str) -> None:
    """The server's key pair in `folder` (once) and `name`'s at the given paths. Raise KeygenError
    rather than replace any key file that exists."""
    for path in (secret_path, public_path):
        if path.exists():
            raise KeygenError(f"{path} exists: -keygen never replaces a key. {replace_hint}")
    public, secret = server_key_paths(folder)
    if public.exists() != secret.exists():
        present, missing = (public, secret) if public.exists() else (secret, public)
        raise KeygenError(f"{present} exists without {missing}: restore it, or remove both to make a new "
                          "server key pair (every client and worker host then needs the new server.key)")
    # Made in a private (0700) folder, then linked into place: a secret is never readable by others,
    # and a link fails rather than replace a file that appeared in the meantime.
    with tempfile.TemporaryDirectory(dir=folder, prefix=".keygen-") as scratch:
        if not secret.exists():
            made_public, made_secret = zmq.auth.create_certificates(scratch, "server")
            _install(made_secret, secret, mode=0o600)
            _install(made_public, public, mode=0o644)
        made_public, made_secret = zmq.auth.create_certificates(scratch, name)
        _install(made_secret, secret_path, mode=0o600)
        _install(made_public, public_path, mode=0o644)


def _install(source: str | Path, target: Path, mode: int) -> None:
    os.chmod(source, mode)
    try:
        os.link(source, target)
    except FileExistsError:
        raise KeygenError(f"{target} exists: -keygen never replaces a key") from None


class Gatekeeper:
    """The authenticator that admits the allowed keys, and the log of connections it refused."""

    def __init__(self, authenticator: ThreadAuthenticator, refusals: "RefusalLog") -> None:
        self.authenticator, self.refusals = authenticator, refusals

    def stop(self) -> None:
        self.refusals.stop()
        self.authenticator.stop()


def start_authenticator(context: zmq.Context, socket: zmq.Socket, auth_dir: str | Path) -> Gatekeeper:
    """Make `socket` a CurveZMQ server that admits only the public keys in `auth_dir/clients`, and
    log (rate-limited) the connections it refuses. Call from the thread that owns `socket`."""
    public_path, secret_path = server_key_paths(auth_dir)
    clients = Path(auth_dir) / "clients"
    if not secret_path.is_file():
        raise FileNotFoundError(f"{secret_path}: no server key; create keys with: python app.py -keygen {auth_dir}")
    if not clients.is_dir() or not any(clients.glob("*.key")):
        raise FileNotFoundError(f"{clients}: no allowed client keys (*.key); create one with: python app.py -keygen {auth_dir}")
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve(domain="*", location=str(clients))
    public, secret = zmq.auth.load_certificate(str(secret_path))
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True
    log.info("CurveZMQ on: %d allowed client keys in %s", len(list(clients.glob("*.key"))), clients)
    return Gatekeeper(authenticator, RefusalLog())


class RefusalLog:
    """Logs connections whose CurveZMQ handshake failed (no keys, a key not allowed, the wrong server
    key): the first at once, then at most one line per REFUSALS_LOG_INTERVAL with the count, since a
    refused client retries every 100 ms. The broker owns the socket's one monitor and hands the events
    over (`on_event`), and calls `log_if_due` now and then."""

    def __init__(self) -> None:
        self.refused = 0                      # in all, since start
        self._unlogged, self._last_reason = 0, ""
        self._logged_at = -REFUSALS_LOG_INTERVAL

    def on_event(self, event: int, value: int, now: float) -> None:
        if event & HANDSHAKE_FAILURES:
            self.refused += 1
            self._unlogged += 1
            reason = refusal_reason(event, value)
            # A handshake cut short says nothing; one that named its cause is what the reader needs.
            if reason != UNKNOWN_REFUSAL or not self._last_reason:
                self._last_reason = reason
            self.log_if_due(now)

    def log_if_due(self, now: float, force: bool = False) -> None:
        if self._unlogged and (force or now - self._logged_at >= REFUSALS_LOG_INTERVAL):
            log.warning("refused %d unauthenticated connection attempt%s on the client port (last: %s); "
                        "%d since start", self._unlogged, "s" if self._unlogged > 1 else "", self._last_reason,
                        self.refused)
            self._unlogged, self._logged_at = 0, now

    def stop(self) -> None:
        self.log_if_due(time.monotonic(), force=True)  # the count since the last line, not lost at shutdown


UNKNOWN_REFUSAL = "a handshake that failed"


def refusal_reason(event: int, value: int) -> str:
    """Why a handshake failed, in a user's words."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return f"a client key that is not allowed (ZAP status {value})"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return "a client without CurveZMQ keys"
        if value in (zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC, zmq.PROTOCOL_ERROR_ZMTP_KEY_EXCHANGE):
            return "a client with the wrong server key"
        return f"a protocol error in the handshake (code {value:#x})"
    return UNKNOWN_REFUSAL


def make_worker_keys(auth_dir: str | Path, worker_name: str) -> dict[str, Path]:
    """Create the server's key pair (once) and a key pair for worker host `worker_name` in
    `auth_dir/workers`, the worker port's allow-list, apart from the clients'. Raise KeygenError
    rather than replace a key file: re-running would lock out the host that has the old pair."""
    check_key_name(worker_name, "-worker_name")
    folder = Path(auth_dir)
    workers = folder / "workers"
    workers.mkdir(parents=True, exist_ok=True)
    public, secret = server_key_paths(folder)
    worker_public, worker_secret = workers / f"{worker_name}.key", workers / f"{worker_name}.key_secret"
    _make_pair(folder, worker_name, worker_secret, worker_public,
               "The host that has it could no longer join: remove both files of the pair first, or choose "
               "another -worker_name")
    return {"server_public": public, "worker_public": worker_public, "worker_secret": worker_secret}

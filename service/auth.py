"""CurveZMQ authentication: key pairs, and the server side of the allow-list.

Layout of an auth folder (made by `python app.py -keygen DIR`):

    DIR/server.key, DIR/server.key_secret      the server's key pair (give clients server.key)
    DIR/clients/NAME.key                        public keys of the clients allowed in
    DIR/NAME.key_secret                         a client's key pair (give it to that client only)
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)


def server_key_paths(auth_dir: str | Path) -> tuple[Path, Path]:
    folder = Path(auth_dir)
    return folder / "server.key", folder / "server.key_secret"


def make_keys(auth_dir: str | Path, client_name: str = "client") -> dict[str, Path]:
    """Create the server's key pair (once) and a key pair for `client_name`, allowed in at once."""
    folder = Path(auth_dir)
    clients = folder / "clients"
    clients.mkdir(parents=True, exist_ok=True)
    public, secret = server_key_paths(folder)
    if not secret.exists():
        zmq.auth.create_certificates(str(folder), "server")
    client_public, client_secret = zmq.auth.create_certificates(str(folder), client_name)
    allowed = clients / Path(client_public).name
    shutil.move(client_public, allowed)
    return {"server_public": public, "server_secret": secret, "client_public": allowed,
            "client_secret": Path(client_secret)}


def start_authenticator(context: zmq.Context, socket: zmq.Socket, auth_dir: str | Path) -> ThreadAuthenticator:
    """Make `socket` a CurveZMQ server that admits only the public keys in `auth_dir/clients`."""
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
    return authenticator


def make_worker_keys(auth_dir: str | Path, worker_name: str) -> dict[str, Path]:
    """Create the server's key pair (once) and a key pair for worker host `worker_name` in
    `auth_dir/workers` (the worker port's allow-list, apart from the clients'). An existing worker
    key is never replaced: re-running would lock out the host that has it."""
    folder = Path(auth_dir)
    workers = folder / "workers"
    if not worker_name or "/" in worker_name or worker_name.startswith("."):
        raise ValueError(f"-worker_name {worker_name!r}: a plain file name is needed")
    if (workers / f"{worker_name}.key").exists() or (workers / f"{worker_name}.key_secret").exists():
        raise ValueError(f"{workers / worker_name}.key: already exists; pick another -worker_name, or delete "
                         "the old pair first (the host that has it can no longer join)")
    workers.mkdir(parents=True, exist_ok=True)
    public, secret = server_key_paths(folder)
    if not secret.exists():
        zmq.auth.create_certificates(str(folder), "server")
    worker_public, worker_secret = zmq.auth.create_certificates(str(workers), worker_name)
    return {"server_public": public, "worker_public": Path(worker_public), "worker_secret": Path(worker_secret)}

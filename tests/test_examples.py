"""The README's main job runs end to end (a shortened run: one seed, few epochs)."""
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")


def test_digits_example_runs():
    out = subprocess.run(
        [sys.executable, "-m", "pydistill.examples.digits", "--seeds", "1", "--epochs", "30",
         "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "hard-only" in out.stdout and "KD" in out.stdout and "mean" in out.stdout

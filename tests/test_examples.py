"""The README's main job runs end to end (a shortened run: one seed, few epochs)."""
import subprocess
import sys

import pytest

from conftest import peer

peer("sklearn")


def test_digits_example_runs():
    out = subprocess.run(
        [sys.executable, "-m", "pydistill.examples.digits", "--seeds", "1", "--epochs", "30",
         "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "hard-only" in out.stdout and "KD" in out.stdout and "mean" in out.stdout


@pytest.mark.parametrize("example", ["llm_distill", "offline_topk", "teacher_assistant"])
def test_llm_examples_run_quick(example, tmp_path):
    peer("transformers")
    peer("safetensors")
    plot = tmp_path / f"{example}.png"
    out = subprocess.run(
        [sys.executable, "-m", f"pydistill.examples.{example}", "--quick", "--plot", str(plot)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "held-out loss" in out.stdout and "student, hard labels only" in out.stdout
    assert "oracle" in out.stdout


def test_minilm_example_runs_quick(tmp_path):
    """BERT teacher -> smaller BERT with MiniLMv2 relations from Q/K/V hooks (SDPA kept): it
    runs, and the distilled student's relation loss to the teacher falls along its run."""
    peer("transformers")
    out = subprocess.run(
        [sys.executable, "-m", "pydistill.examples.minilm", "--quick", "--plot",
         str(tmp_path / "minilm.png")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "student, MLM only" in out.stdout and "student, MLM + relations" in out.stdout
    lines = out.stdout.split("along the student runs")[1].split("\n\n")[0].splitlines()[2:]
    relation = [float(line.split()[-1]) for line in lines]
    assert len(relation) >= 3 and relation[-1] < relation[0], out.stdout


def test_cross_tokenizer_example_runs_quick(tmp_path):
    """Teacher and student with different tokenizers trained in the run (byte-level BPE,
    Metaspace BPE), ULD on offset-aligned positions against hard labels: it runs and reports
    both students, the teacher and the oracle per character, and saves the plot."""
    peer("transformers")
    peer("tokenizers")
    plot = tmp_path / "cross_tokenizer.png"
    out = subprocess.run(
        [sys.executable, "-m", "pydistill.examples.cross_tokenizer", "--quick", "--plot",
         str(plot)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for line in ("student, hard labels only", "student, ULD + CE", "teacher (its own tokens)",
                 "oracle (the HMM", "whose text prefix ends where a teacher token ends"):
        assert line in out.stdout, out.stdout
    rows = {line.split("  ")[1].strip(): line.split() for line in out.stdout.splitlines()
            if line.startswith("  student,") or line.startswith("  teacher (")}
    per_char = {name: float(fields[-3] if name.startswith("student") else fields[-1])
                for name, fields in rows.items()}
    assert all(0 < v < 10 for v in per_char.values()), out.stdout
    assert plot.is_file()

"""Every ```python block of README.md runs as written, each on its own (a fresh interpreter,
nothing from the blocks before it), on the CPU in a few seconds: the README's shapes are small
for that. A block that needs an optional peer (transformers, TRL) is skipped without it."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
# the optional peers a block may import, and the module to look for
PEERS = {"transformers": "transformers", "trl": "trl", "peft": "peft"}


def python_blocks():
    """(the section heading and line of the block, its code) for each ```python block."""
    text = README.read_text(encoding="utf-8")
    blocks, heading = [], "top"
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            heading = line.lstrip("#").strip()
        if line.strip() == "```python":
            start = i + 1
            end = start
            while lines[end].strip() != "```":
                end += 1
            blocks.append((f"{heading} (line {start})", "\n".join(lines[start:end]) + "\n"))
            i = end
        i += 1
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 8


@pytest.mark.parametrize("code", [code for _, code in BLOCKS], ids=[name for name, _ in BLOCKS])
def test_readme_block_runs(code, tmp_path):
    for module, package in PEERS.items():
        if re.search(rf"^\s*(import|from) {module}\b", code, re.M):
            pytest.importorskip(package)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(README.parent), os.environ.get("PYTHONPATH", "")]), "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=240, cwd=tmp_path, env=env)
    if out.returncode == -6 and out.stderr.strip() == "terminate called without an active exception":
        # gloo's threads can abort the interpreter at exit after the block has finished (an
        # intermittent teardown crash of the distributed block); the block is run once more
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=240, cwd=tmp_path, env=env)
    assert out.returncode == 0, f"{code}\n---\n{out.stderr[-3000:]}"

"""The checkout's top-level folders never shadow an installed package.

``kernels/`` and ``examples/`` are installed as ``pydistill.kernels`` and
``pydistill.examples`` (pyproject.toml's package-dir). Real distributions on PyPI share those
names: Hugging Face's ``kernels``, which ``import transformers`` imports, among them. Python
puts the current folder first on ``sys.path`` (``python -m pytest``, ``python -m
pydistill.examples.x`` from the repository root), so a regular package there would win over
the installed one. The folders therefore hold no ``__init__.py``: each is a namespace-package
portion, and the import system takes any regular package of that name, wherever it sits on
``sys.path``, over every namespace portion. ``pydistill/kernels`` and ``pydistill/examples``
are links to them, so ``pydistill.kernels`` imports from the source tree (and from an editable
install, whose finder cannot map a namespace subpackage) as it does from a wheel.

Each check runs in a fresh interpreter, from the repository root and from ``/``, and once more
against a wheel built from this checkout and installed outside it.
"""
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import peer

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("kernels", "examples", "bench")
KERNEL_MODULES = ("softmax_divergence", "topk_divergence", "linear_kd", "attention_kd")


def run_python(code, cwd, **env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PYDISTILL_")}
    full_env.update(env)
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=full_env,
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, f"from {cwd}:\n{out.stderr}"
    return out.stdout


def _installed_location(name):
    """The folder of the installed regular package ``name`` (not this checkout's), or None."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    init = next((f for f in dist.files or () if str(f) == f"{name}/__init__.py"), None)
    return None if init is None else Path(dist.locate_file(init)).resolve().parent


HF_KERNELS = _installed_location("kernels")
needs_hf_kernels = pytest.mark.skipif(
    HF_KERNELS is None, reason="Hugging Face's kernels is not installed (the dev extra brings it)")
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="the kernel modules import Triton")


@pytest.mark.parametrize("folder", FOLDERS + tuple(f"pydistill/{f}" for f in FOLDERS))
def test_checkout_folders_are_namespace_portions(folder):
    assert (ROOT / folder).is_dir()
    assert not (ROOT / folder / "__init__.py").exists(), (
        f"{folder}/__init__.py makes the folder a regular package that shadows any installed "
        f"package of that name when Python runs from the repository root")


@pytest.mark.parametrize("folder", FOLDERS)
def test_links_point_at_the_top_level_folders(folder):
    assert (ROOT / "pydistill" / folder).resolve() == (ROOT / folder).resolve()


@needs_hf_kernels
@pytest.mark.parametrize("cwd", [ROOT, Path("/")], ids=["repo-root", "elsewhere"])
def test_installed_kernels_wins_over_the_checkout(cwd):
    out = run_python(
        """
        import kernels
        print(kernels.__file__)
        """,
        cwd,
    )
    assert Path(out.strip()).resolve().parent == HF_KERNELS


@pytest.mark.parametrize("cwd", [ROOT, Path("/")], ids=["repo-root", "elsewhere"])
def test_transformers_imports(cwd):
    peer("transformers")
    out = run_python(
        """
        import transformers
        from transformers import Trainer, TrainingArguments
        print(transformers.__version__)
        """,
        cwd,
    )
    assert out.strip()


@needs_triton
@pytest.mark.parametrize("cwd", [ROOT, Path("/")], ids=["repo-root", "elsewhere"])
def test_pydistill_subpackages_import(cwd):
    out = run_python(
        f"""
        import importlib, pathlib
        for name in {KERNEL_MODULES!r}:
            m = importlib.import_module("pydistill.kernels." + name)
            print(pathlib.Path(m.__file__).resolve())
        import pydistill.examples.digits as d
        print(pathlib.Path(d.__file__).resolve())
        """,
        cwd,
        TRITON_INTERPRET="1",
    )
    files = [Path(line) for line in out.split()]
    assert [f.stem for f in files] == list(KERNEL_MODULES) + ["digits"]
    assert all(f.is_relative_to(ROOT / "kernels") for f in files[:-1])
    assert files[-1].is_relative_to(ROOT / "examples")


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory):
    """This checkout built as a wheel (no CUDA extension) and unpacked outside it."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "PYDISTILL_SKIP_CUDA_BUILD": "1"}
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp / "dist"), str(ROOT)],
        check=True, env=env, capture_output=True, timeout=600,
    )
    wheel = next((tmp / "dist").glob("pydistill_kernels-*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
         str(tmp / "site"), str(wheel)],
        check=True, env=env, capture_output=True, timeout=600,
    )
    return tmp / "site"


def test_wheel_installs_only_pydistill(wheel_site):
    top = sorted(p.name for p in wheel_site.iterdir() if not p.name.endswith(".dist-info"))
    assert top == ["bin", "pydistill"]  # bin/: the pydistill-bench and pydistill-capture console scripts
    assert sorted(p.name for p in (wheel_site / "bin").iterdir()) == ["pydistill-bench",
                                                                       "pydistill-capture"]
    assert {p.name for p in (wheel_site / "pydistill" / "offline").glob("*.py")} == \
        {p.name for p in (ROOT / "pydistill" / "offline").glob("*.py")}
    for folder in FOLDERS:
        sub = wheel_site / "pydistill" / folder
        assert sub.is_dir() and not sub.is_symlink()
        assert {p.name for p in sub.glob("*.py")} == {p.name for p in (ROOT / folder).glob("*.py")}


@needs_triton
def test_wheel_install_imports(wheel_site):
    hf = "" if HF_KERNELS is None else "import kernels; print(kernels.__file__)"
    out = run_python(
        f"""
        import importlib, pathlib
        import pydistill
        print(pathlib.Path(pydistill.__file__).resolve())
        for name in {KERNEL_MODULES!r}:
            importlib.import_module("pydistill.kernels." + name)
        import pydistill.examples.digits
        {hf}
        """,
        "/",
        PYTHONPATH=str(wheel_site),
        TRITON_INTERPRET="1",
    )
    lines = out.split()
    assert Path(lines[0]).is_relative_to(wheel_site.resolve())
    if HF_KERNELS is not None:
        assert Path(lines[1]).resolve().parent == HF_KERNELS


def test_pydistill_bench_from_a_wheel_outside_the_checkout(wheel_site, tmp_path):
    """The console script a ``pip install pydistill-kernels[bench]`` user gets: no checkout,
    results in the folder given, pydistill's version in every row."""
    import csv

    import pydistill

    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYDISTILL_") and k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(wheel_site), PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(wheel_site / "bin" / "pydistill-bench"), "--smoke", "--family",
         "softmax", "--device", "cpu", "--no-progress", "--no-plots", "--out", "results"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (csv_path,) = (tmp_path / "results").glob("suite-*-smoke-*.csv")
    assert csv_path.with_suffix(".md").is_file()
    rows = list(csv.DictReader(csv_path.open()))
    assert rows and {r["family"] for r in rows} == {"softmax"}
    assert {r["pydistill"] for r in rows} == {pydistill.__version__}
    assert {r["git_rev"] for r in rows} == {"installed"}

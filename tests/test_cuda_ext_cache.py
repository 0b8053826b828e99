"""The CUDA extension's JIT cache: one folder per architecture list, and ``load(build=False)``
finds an up-to-date build there (bench/gpu_check.py builds in a subprocess, then loads)."""
import os
import time

import pytest

from pydistill import _cuda_ext


def test_cache_folder_is_keyed_by_arch_list(monkeypatch, tmp_path):
    monkeypatch.setenv("PYDISTILL_CUDA_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    h100 = _cuda_ext.cache_dir()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    both = _cuda_ext.cache_dir()
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    default = _cuda_ext.cache_dir()
    assert h100 != both and both == default
    assert h100.parent == tmp_path and h100.name.endswith("-sm9_0")


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    """A cache folder holding a 'built' library; load_library records instead of loading."""
    monkeypatch.setenv("PYDISTILL_CUDA_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setenv("PYDISTILL_CUDA_JIT", "1")
    monkeypatch.setattr(_cuda_ext, "_state", {"loaded": None, "error": "unset", "tried": False})
    monkeypatch.setattr(_cuda_ext, "_prebuilt", lambda: None)
    monkeypatch.setattr(_cuda_ext, "_register_python_side", lambda: None)
    loaded = []
    monkeypatch.setattr(_cuda_ext.torch.ops, "load_library", loaded.append)
    library = _cuda_ext.cache_dir() / "pydistill_C.so"
    library.parent.mkdir(parents=True)
    library.write_bytes(b"")
    return library, loaded


def test_load_without_build_takes_an_up_to_date_cached_build(fake_build):
    library, loaded = fake_build
    assert _cuda_ext.load(build=False)
    assert loaded == [str(library)]


def test_load_without_build_ignores_a_stale_or_foreign_build(fake_build, monkeypatch):
    library, loaded = fake_build
    old = min((_cuda_ext.CSRC / s).stat().st_mtime for s in _cuda_ext.SOURCES) - 60
    os.utime(library, (old, old))  # older than the sources
    assert not _cuda_ext.load(build=False)
    now = time.time()
    os.utime(library, (now, now))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")  # built for another arch list
    assert not _cuda_ext.load(build=False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setenv("PYDISTILL_CUDA_JIT", "0")  # the JIT switched off: not even loaded
    assert not _cuda_ext.load(build=False)
    assert loaded == []

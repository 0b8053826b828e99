"""Compile Triton kernels ahead of time for a GPU architecture, without a GPU.

The Triton interpreter runs kernels as NumPy and accepts code that the compiler rejects
(non-constexpr globals, type mismatches between branches, ...). This module runs the real
compiler (Triton -> TTGIR -> LLVM -> PTX -> cubin with the ptxas bundled in Triton) for a
target named explicitly, so a CPU-only machine proves that every kernel variant compiles.

Argument types follow the naming convention of kernels/: ``*_ptr`` are pointers (element
type from ``pointer_types``, float32 otherwise), ``*_stride*``, ``n_*``, the sizes ``N``,
``V``, ``H``, ``K`` (and their ``_s`` / ``_t`` forms), ``tile_start`` and ``ignore_index`` are
integers, everything else is a float32 scalar.

Run as a script (with TRITON_INTERPRET unset) it compiles the variants named on the command
line and prints one line each; tests/test_kernels_compile.py drives it in a subprocess.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

INT_ARGS = re.compile(r"(_stride|^n_|^[NVHK](_[st])?$|^tile_start$|^ignore_index$)")


def signature(fn, consts, pointer_types, int_type="i32"):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointer_types.get(name, "fp32")
        elif INT_ARGS.search(name):
            sig[name] = int_type
        else:
            sig[name] = "fp32"
    return sig


def compile_variant(fn, consts, pointer_types, arch, num_warps, int_type="i32"):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pydistill.kernels.softmax_divergence import LAUNCH_OPTIONS

    src = ASTSource(fn=fn, signature=signature(fn, consts, pointer_types, int_type), constexprs=consts)
    options = dict(LAUNCH_OPTIONS, num_warps=num_warps)  # what the launchers pass
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def ptxas_path(arch):
    """The ptxas Triton itself uses for ``arch``: Triton >= 3.9 bundles two (sm_90 and newer
    take the newer one, which alone reads the PTX version it emits)."""
    import triton

    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:
        get_ptxas = None
    if get_ptxas is not None:
        try:
            tool = get_ptxas(arch)
        except TypeError:  # older Triton: one ptxas for every architecture
            tool = get_ptxas()
        path = getattr(tool, "path", None) or (tool[0] if isinstance(tool, tuple) else None)
        if path:
            return path
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def ptxas_report(compiled, arch):
    """(registers, spill-store bytes) as ptxas reports them for the kernel's PTX."""
    ptxas = ptxas_path(arch)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    target = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    out = subprocess.run([ptxas, f"-arch={target}", "-v", f.name, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores", out)
    if regs is None:
        raise RuntimeError(f"{ptxas} reported no register count:\n{out[-2000:]}")
    return (int(regs.group(1)) if regs else None, int(spills.group(1)) if spills else None)


def main(variants):
    import importlib

    for v in variants:
        module = importlib.import_module(v["module"])
        fn = getattr(module, v["kernel"])
        compiled = compile_variant(fn, v["consts"], v["pointer_types"], v["arch"], v["num_warps"],
                                   v.get("int_type", "i32"))
        regs, spills = ptxas_report(compiled, v["arch"])
        print(json.dumps({"name": v["name"], "registers": regs, "spill_bytes": spills}), flush=True)


if __name__ == "__main__":
    main(json.load(open(sys.argv[1])))

"""A predicted lower bound from compiled code: what each Triton kernel launch of pydistill's
forward + backward would cost on a target GPU (sm_90, the H100 SXM, by default), without one.

Nothing here is a measurement. For each goal shape (``cases.GOAL``, plus ``cases.EXTRA``;
bench/cases.py) the family script's own ``pydistill-triton`` builder is called through the
public API on *fake* CUDA tensors (``torch._subclasses.FakeTensorMode``: shapes, strides and
dtypes, no memory, so the 4 GB logits of N=16384, V=128256 cost nothing). Triton's
``JITFunction.run`` is wrapped: each launch goes through Triton's own binder (so the
specialisations, 16-byte alignment of pointers and divisibility by 16 of integers included,
are the JIT's), and compiles through ``triton.compile`` for the target that a stand-in driver
reports (``GPUTarget("cuda", 90, 32)``); nothing is launched. Pointers are given the address
a caching allocator would (a 512-byte aligned base plus the view's storage offset). The
backward runs by walking the autograd graph by hand (the autograd engine wants a real CUDA
context), calling each node's backward on the fake gradients.

Per launch, from the cubin (``cuobjdump -res-usage`` and ``nvdisasm -g`` of Triton's nvidia
backend ``bin`` folder):

``regs``, ``local_bytes``   registers per thread; local memory per thread (spills, arrays)
``spill_stores``            STL instructions in the code (0 for a kernel without spills)
``ctas_per_sm``, ``limiter`` resident CTAs per SM (registers, shared memory, warps, 32 CTAs)
``mma``                     ``wgmma`` (HGMMA), ``mma.sync`` (HMMA) or ``-``
``atomics``                 atomic / reduction instructions of the PTX with their semantics
                            (``relaxed``, ``acq_rel``, ...) and the fences (``fence``/``membar``)
``warp_instructions``       SASS instructions executed, summed over warps: every instruction
                            outside a loop once per warp, an instruction inside a loop times
                            the product of its loops' trip counts (below)
``max_load_bytes``          the widest global load of a thread (16: the JIT's alignment and
                            divisibility specialisation gave 128-bit vector loads)
``bytes``                   the lesser of (a) the global loads / stores / atomics of the SASS,
                            times their width and 32 lanes and their executed count (every
                            access reaches DRAM) and (b) the footprint of the tensor arguments
                            (each read or written once: a perfect cache)
``flops``                   tensor-core FLOPs (HMMA m16n8k16 = 4096 per warp instruction,
                            HGMMA 64xNx16 = 2*64*N*16 per warp group instruction)

Loop trip counts: a loop is a backward branch of the SASS; nvdisasm's line table names the
Python ``for`` statement its body comes from (the innermost one enclosing most of its lines).
The statement's ``range(...)`` is evaluated with the launch's integer arguments and
constexprs, after the straight-line assignments that precede it in its function (a helper's
parameters bound from its call in the kernel); ``tl.program_id`` is 0, so a loop whose range
depends on the program counts the first program's share, taken as every program's. A range
that cannot be evaluated (it depends on loaded data) counts once and is flagged
(``unresolved_loops``, summed on the case's total row; the report marks that case's time as
a lower bound, and the CI gate refuses a kernel with more unresolved loops than committed). Branches inside a loop are counted as taken (an upper bound on that
body, noted as such).

Predicted time of a launch = max(bytes / BANDWIDTH, warp_instructions / ISSUE_RATE,
flops / TENSOR_PEAK); of a case, the sum over its launches; ``ratio`` = that over the family's
floor (``Case.floor_bytes`` / BANDWIDTH for the memory-bound families, ``Case.flops`` /
TENSOR_PEAK for the GEMM-bound ones; fwd+bwd). Occupancy and latency do not enter: a
lower bound.

    python -m pydistill.bench.static                  # writes bench/results/static-sm90.{csv,md}
    python -m pydistill.bench.static --family softmax --out /tmp/s.csv
    pydistill-bench --static
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import functools
import inspect
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from pydistill.bench import cases, harness


@dataclass(frozen=True)
class Target:
    """The GPU the model predicts for. Constants of the H100 SXM (issue 21): bandwidth,
    tensor peak (dense bf16), issue rate = SMs x 4 schedulers x boost clock."""
    name: str
    arch: int
    device: str
    bandwidth: float  # bytes / s
    tensor_flops: float  # bf16 dense FLOP / s
    sms: int
    schedulers: int
    clock_hz: float
    regs_per_sm: int = 65536
    smem_per_sm: int = 228 * 1024
    smem_reserved_per_cta: int = 1024
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32

    @property
    def issue_rate(self) -> float:
        """Warp-instructions per second, all SMs."""
        return self.sms * self.schedulers * self.clock_hz

    def constants(self) -> str:
        return (f"{self.device}: bandwidth {self.bandwidth / 1e12:.1f} TB/s, tensor peak "
                f"{self.tensor_flops / 1e12:.0f} TFLOP/s (bf16 dense), issue "
                f"{self.sms} SMs x {self.schedulers} schedulers x {self.clock_hz / 1e9:.3f} GHz "
                f"= {self.issue_rate / 1e12:.3f} T warp-instructions/s")


TARGETS = {
    "sm_90": Target("sm_90", 90, "H100 SXM", 3.0e12, 800e12, 132, 4, 1.755e9),
}

FAMILY_MODULES = {f.name: f.module for f in cases.FAMILIES}
GEMM_BOUND = tuple(f.name for f in cases.FAMILIES if f.floor == "gemm")

CSV_COLUMNS = (
    "family", "case", "phase", "kernel", "grid", "num_warps", "regs", "spill_stores",
    "local_bytes", "shared_bytes", "ctas_per_sm", "limiter", "mma", "atomics", "fences",
    "elements", "warp_instructions", "instructions_per_element", "bytes", "bytes_sass",
    "bytes_footprint", "max_load_bytes", "flops", "unresolved_loops", "predicted_ms", "bound", "floor_ms", "ratio",
)


# --------------------------------------------------------------------------------------
# The stand-in driver and the launch capture
# --------------------------------------------------------------------------------------


class StandInDriver:
    """What Triton's JIT asks of a driver before it compiles: the target, a device and a
    stream. It cannot load or launch a kernel (nothing is launched)."""

    def __init__(self, target):
        self.target = target

    @staticmethod
    def is_active():
        return False

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cuda", 0)

    def get_device_interface(self):
        return torch.cuda

    def __getattr__(self, name):
        raise RuntimeError(f"the stand-in driver cannot {name}: nothing runs on a device here")


@dataclass
class TensorArg:
    """A tensor argument as the kernel sees it: its address, dtype and footprint."""
    dtype: torch.dtype
    address: int
    footprint: int  # bytes spanned by the view
    storage: int  # identifies the storage the view belongs to

    def data_ptr(self):
        return self.address


_BASE = 0x7F0000000000


def _tensor_arg(x):
    if not isinstance(x, torch.Tensor):
        return x
    e = x.element_size()
    span = 0 if x.numel() == 0 else (sum((s - 1) * abs(st) for s, st in zip(x.shape, x.stride())) + 1) * e
    return TensorArg(x.dtype, _BASE + x.storage_offset() * e, span, x.untyped_storage()._cdata)


@dataclass
class Launch:
    phase: str
    fn: object  # the JITFunction
    kernel: object  # the CompiledKernel
    grid: tuple
    args: dict  # parameter name -> value (TensorArg, int, float, constexpr value)


class Capture:
    def __init__(self):
        self.launches: list = []
        self.torch_ops: list = []  # (phase, aten op, bytes, flops)
        self.phase = "fwd"


# aten ops that move no data (views, allocations without a fill, metadata)
_NO_TRAFFIC = re.compile(
    r"^(view|_unsafe_view|reshape|t|transpose|permute|expand|slice|select|as_strided|unsqueeze|"
    r"squeeze|detach|alias|empty|empty_like|empty_strided|new_empty|new_empty_strided|"
    r"unbind|split|split_with_sizes|chunk|narrow|lift_fresh|_to_copy_noop|sym_size|"
    r"sym_stride|sym_numel|is_same_size|_has_compatible_shallow_copy_type|device|dim|size|"
    r"stride|numel|_local_scalar_dense)$")


def _matmul_flops(name, args, out) -> float:
    name = name.rstrip("_")
    if name in ("mm", "addmm", "bmm", "baddbmm"):
        a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
        return 2.0 * a.numel() * b.shape[-1]
    return 0.0


def _torch_recorder(capture: Capture):
    """A dispatch mode recording the aten ops the public API runs besides the Triton kernels
    (cuBLAS GEMMs, casts, reductions): bytes of their tensor inputs and outputs, GEMM FLOPs."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if not _NO_TRAFFIC.match(name):
                tensors = list({id(x): x for x in tree_leaves((args, kwargs, out))
                                if isinstance(x, torch.Tensor)}.values())
                moved = sum(x.numel() * x.element_size() for x in tensors)
                capture.torch_ops.append((capture.phase, name, moved, _matmul_flops(name, args, out)))
            return out

    return Recorder()


def triton_unsupported() -> Optional[str]:
    """Why the stand-in cannot compile with the installed Triton, or None."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction
    except Exception as exc:  # no Triton, or one without these modules
        return f"Triton's JIT modules are not importable ({exc})"
    from packaging.version import Version

    if Version(triton.__version__).release[:2] < (3, 6):
        return f"Triton {triton.__version__}: the stand-in follows the JIT of Triton 3.6 and later"
    params = inspect.signature(JITFunction.run).parameters
    if "grid" not in params or "warmup" not in params:
        return f"Triton {triton.__version__}: JITFunction.run takes no grid / warmup"
    if not hasattr(driver, "set_active"):
        return f"Triton {triton.__version__}: the runtime driver cannot be replaced"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1: kernels are interpreted, not compiled (unset it)"
    return None


class _Props:
    """torch.cuda.get_device_properties of the target, for the launchers' sizing."""

    def __init__(self, target: Target):
        self.name = target.device
        self.major, self.minor = divmod(target.arch, 10)
        self.multi_processor_count = target.sms
        self.total_memory = 80 * 10**9
        self.max_threads_per_multi_processor = 2048
        self.shared_memory_per_block_optin = 227 * 1024
        self.L2_cache_size = 50 * 2**20


@contextlib.contextmanager
def standin(target: Target, capture: Capture):
    """Triton's JIT compiles for ``target`` and records each launch in ``capture`` instead of
    launching; torch.cuda answers the few queries the launchers make as the target would (an
    80 GB device with 75 GB free)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    original_run = JITFunction.run
    stand_in = StandInDriver(GPUTarget("cuda", target.arch, 32))

    def run(self, *args, grid, warmup, **kwargs):
        args = tuple(_tensor_arg(a) for a in args)
        kwargs = {k: _tensor_arg(v) for k, v in kwargs.items()}
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        if warmup:
            return kernel
        binder = self.device_caches[0][-1]  # the binder is the last entry (Triton 3.6-3.9)
        bound, _, _ = binder(*args, **kwargs)
        if callable(grid):
            grid = grid(bound)
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        values = {k: (v.value if hasattr(v, "value") and not isinstance(v, TensorArg) else v)
                  for k, v in bound.items()}
        capture.launches.append(Launch(capture.phase, self, kernel, grid, values))
        return kernel

    patches = {
        "get_device_properties": lambda device=None: _Props(target),
        "mem_get_info": lambda device=None: (75 * 10**9, 80 * 10**9),
        "memory_reserved": lambda device=None: 0,
        "memory_allocated": lambda device=None: 0,
        "current_device": lambda: 0,
    }
    saved = {name: getattr(torch.cuda, name) for name in patches}
    driver.set_active(stand_in)
    JITFunction.run = run
    for name, fn in patches.items():
        setattr(torch.cuda, name, fn)
    try:
        yield capture
    finally:
        JITFunction.run = original_run
        for name, fn in saved.items():
            setattr(torch.cuda, name, fn)
        if hasattr(driver, "reset_active") and driver._default is not None:
            driver.reset_active()
        else:
            driver._active = None


def backward(loss: torch.Tensor, grad: torch.Tensor) -> None:
    """``loss.backward(grad)`` without the autograd engine (which needs a CUDA context): the
    graph's nodes in topological order, each called on the sum of its incoming gradients."""
    root = loss.grad_fn
    if root is None:
        return
    pending = defaultdict(int)
    seen, stack = {root}, [root]
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            pending[nxt] += 1
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    grads = defaultdict(dict)
    grads[root][0] = grad
    ready = [root]
    while ready:
        node = ready.pop()
        inputs = grads.pop(node, {})
        if type(node).__name__ == "AccumulateGrad":
            continue
        count = max(inputs, default=0) + 1
        args = [inputs.get(i) for i in range(count)]
        out = node.apply(*args) if hasattr(node, "_forward_cls") else node(*args)
        out = out if isinstance(out, tuple) else (out,)
        for (nxt, nr), g in zip(node.next_functions, out):
            if nxt is None:
                continue
            if g is not None:
                have = grads[nxt].get(nr)
                grads[nxt][nr] = g if have is None else have + g
            pending[nxt] -= 1
            if pending[nxt] == 0:
                ready.append(nxt)


def _to_fake_cuda(x):
    if isinstance(x, torch.Tensor):
        y = x.detach().to("cuda")
        return y.requires_grad_(x.requires_grad)
    if isinstance(x, (tuple, list)):
        return type(x)(_to_fake_cuda(v) for v in x)
    return x


@dataclass
class StaticCase:
    family: str
    name: str
    argv: str
    impl: str
    extra: str = ""


def goal_cases(families=None) -> list:
    """The goal shapes (``cases.GOAL``, the family scripts' arguments, shared with the GPU
    check and the suite) through each family's ``pydistill-triton``, then ``cases.EXTRA``."""
    out = [StaticCase(family, "goal", argv, "pydistill-triton") for family, argv in cases.GOAL.items()]
    out += [StaticCase(*c) for c in cases.EXTRA]
    return [c for c in out if families is None or c.family in families]


def family_cases(sc: StaticCase, module) -> list:
    """The family script's Case objects for ``sc``'s arguments (as on a CUDA device)."""
    return module.cases_from(module.parse_args(sc.argv.split()), torch.device("cuda"))


def case_label(sc: StaticCase, case) -> str:
    fields = [f"{k}={getattr(case, k)}" for k in ("n", "v", "v_t", "k", "top_k", "b", "h", "length")
              if hasattr(case, k) and not callable(getattr(case, k)) and getattr(case, k)]
    if getattr(case, "v_t", None) == getattr(case, "v", None):
        fields = [f for f in fields if not f.startswith("v_t=")]
    div = getattr(case, "divergence", None)
    head = sc.name if sc.name != "goal" else (div or "goal")
    return f"{head} " + " ".join(fields)


def capture_case(sc: StaticCase, case, module, target: Target) -> list:
    """The launches of one forward + backward of ``sc``'s implementation on ``case``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    impl = next(i for i in module.IMPLS if i.name == sc.impl)
    capture = Capture()
    env = dict(impl.env)
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with standin(target, capture), FakeTensorMode(allow_non_fake_inputs=True):
            device = torch.device("cuda")
            fn = impl.build(case, device)
            if isinstance(fn, str):
                raise RuntimeError(fn)
            inputs = _to_fake_cuda(module.make_inputs(case, torch.device("cpu"), 1)[0])
            labels = (torch.randint(0, case.v, (case.n,), device=device)
                      if sc.extra == "labels" else None)
            grad = torch.full((), float(getattr(case, "grad_output", 1.0)), device=device)
            with _torch_recorder(capture):
                if sc.extra == "labels":
                    import pydistill

                    loss = pydistill.kd_loss(*inputs, labels=labels, divergence=case.divergence,
                                             temperature=case.temperature, beta=case.beta,
                                             hard_weight=0.5, soft_weight=0.5, backend="triton")
                else:
                    loss = fn(*inputs)
                capture.phase = "bwd"
                backward(loss, grad.expand_as(loss) if loss.dim() else grad)
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return capture


# --------------------------------------------------------------------------------------
# Reading the compiled code
# --------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name} is not in Triton's nvidia backend ({path})")
    return path


def _run_tool(name: str, cubin: bytes, *flags) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([_tool(name), *flags, path], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{name} {' '.join(flags)} failed: {out.stderr[-1000:]}")
    return out.stdout


_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:(@!?U?P\w+)\s+)?([A-Z][A-Za-z0-9_.]*)(.*?);")
_LOC = re.compile(r'"([^"]+)", line (\d+)')
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


@dataclass
class Instr:
    address: int
    opcode: str
    operands: str
    locations: frozenset  # (file, line) of the source, its inlining sites included


def parse_sass(text: str) -> list:
    """The instructions of nvdisasm -g -gi output, each with its source locations; branch
    operands name their target address (labels resolved)."""
    instrs, labels, pending_locs, locs = [], {}, [], frozenset()
    pending_labels = []
    for line in text.splitlines():
        if line.lstrip().startswith("//##"):
            pending_locs += [(f, int(n)) for f, n in _LOC.findall(line)]
            continue
        m = _LABEL.match(line.strip())
        if m:
            pending_labels.append(m.group(1))
            continue
        m = _INSTR.match(line)
        if m:
            if pending_locs:
                locs, pending_locs = frozenset(pending_locs), []
            address = int(m.group(1), 16)
            for label in pending_labels:
                labels[label] = address
            pending_labels = []
            instrs.append(Instr(address, m.group(3), m.group(4), locs))
    for label in pending_labels:
        labels[label] = instrs[-1].address + 16 if instrs else 0
    for ins in instrs:
        t = _TARGET.search(ins.operands)
        ins.target = labels.get(t.group(1)) if (t and ins.opcode.startswith("BRA")) else None
    return instrs


def sass_loops(instrs: list) -> list:
    """(start index, end index) of each loop: the span from a branch target to the last branch
    back to it (several back edges to one head are one loop; two spans that overlap without
    nesting, the rotated halves of one loop, are merged)."""
    index = {ins.address: i for i, ins in enumerate(instrs)}
    ends = {}
    for i, ins in enumerate(instrs):
        if ins.target is not None and ins.target < ins.address and ins.target in index:
            start = index[ins.target]
            ends[start] = max(ends.get(start, i), i)
    spans = sorted(ends.items())
    merged = True
    while merged:
        merged = False
        for x in range(len(spans)):
            for y in range(len(spans)):
                (a1, b1), (a2, b2) = spans[x], spans[y]
                if a1 < a2 <= b1 < b2:
                    spans = [s for i, s in enumerate(spans) if i not in (x, y)] + [(a1, b2)]
                    merged = True
                    break
            if merged:
                break
    return sorted(set(spans), key=lambda lo: (lo[0], -lo[1]))


# ---- loop trip counts from the Python source --------------------------------------------


class _Unknown(Exception):
    pass


class _AnyValue:
    """A value the host cannot know (a load, a helper's result): truthy, and any arithmetic,
    attribute or call on it is unknown again. ``tl.where`` on it takes the first branch, so a
    row that "counts" is the one modelled."""

    def __bool__(self):
        return True

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self

    def __iter__(self):
        raise _Unknown("iterating an unknown value")

    def _op(self, *args):
        return self

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __floordiv__ = _op
    __rfloordiv__ = __truediv__ = __rtruediv__ = __mod__ = __rmod__ = __neg__ = _op
    __lt__ = __le__ = __gt__ = __ge__ = __and__ = __rand__ = __or__ = __ror__ = _op
    __lshift__ = __rshift__ = __invert__ = _op

    def __index__(self):
        raise _Unknown("an unknown value as an integer")

    __int__ = __index__


ANY = _AnyValue()


class _Int(int):
    """A host integer that takes Triton's ``.to(dtype)``."""

    def to(self, *args, **kwargs):
        return self


class _TlStub:
    """The part of triton.language a range bound may use, on host integers."""

    def __init__(self, grid):
        self._grid = grid

    def program_id(self, axis=0):
        return _Int(0)

    def num_programs(self, axis=0):
        return _Int(self._grid[axis])

    @staticmethod
    def cdiv(a, b):
        return a if a is ANY or b is ANY else -(-a // b)

    @staticmethod
    def where(cond, a, b):
        return a if cond is ANY or cond else b

    @staticmethod
    def full(shape, value, dtype=None):
        return value

    @staticmethod
    def minimum(a, b):
        return ANY if ANY in (a, b) else min(a, b)

    @staticmethod
    def maximum(a, b):
        return ANY if ANY in (a, b) else max(a, b)

    @staticmethod
    def constexpr(x):
        return x

    def __getattr__(self, name):
        return ANY


class _Namespace(dict):
    def __missing__(self, name):
        return ANY


def _eval(node, ns):
    try:
        return eval(compile(ast.Expression(node), "<range>", "eval"), {"__builtins__": {}}, ns)
    except Exception as exc:
        raise _Unknown(str(exc)) from exc


def _assign(target, value, ns):
    if value is ANY and not isinstance(target, ast.Name):
        for node in ast.walk(target):
            if isinstance(node, ast.Name):
                ns[node.id] = ANY
    elif isinstance(target, ast.Name):
        ns[target.id] = value
    elif isinstance(target, (ast.Tuple, ast.List)):
        values = list(value)
        for t, v in zip(target.elts, values):
            _assign(t, v, ns)
    else:
        raise _Unknown("target")


def _forget(target, ns):
    for node in ast.walk(target):
        if isinstance(node, ast.Name):
            ns.pop(node.id, None)


def _walk_to(stmts, goal, ns) -> bool:
    """Evaluate the straight-line assignments of ``stmts`` in order until ``goal`` (a For node)
    is reached; True when it was. Unknown values are dropped from ``ns``."""
    for st in stmts:
        if st is goal:
            return True
        if isinstance(st, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = st.targets if isinstance(st, ast.Assign) else [st.target]
            try:
                if st.value is None:
                    continue
                value = _eval(st.value, ns)
                if isinstance(st, ast.AugAssign):
                    value = _eval(ast.BinOp(ast.Name(st.target.id, ast.Load()), st.op,
                                            ast.Constant(value)), ns)
                for t in targets:
                    _assign(t, value, ns)
            except (_Unknown, TypeError, ValueError):
                for t in targets:
                    _forget(t, ns)
        elif isinstance(st, ast.If):
            try:
                branches = [st.body] if _eval(st.test, ns) else [st.orelse]
            except _Unknown:
                branches = [st.body, st.orelse]
            for b in branches:
                if _contains(b, goal):
                    return _walk_to(b, goal, ns)
            for b in branches:
                _walk_to(b, goal, ns)
        elif isinstance(st, (ast.For, ast.While, ast.With)):
            if _contains(st.body, goal):
                if isinstance(st, ast.For):
                    try:
                        _assign(st.target, next(iter(_range(st, ns))), ns)
                    except (_Unknown, StopIteration, TypeError):
                        _forget(st.target, ns)
                return _walk_to(st.body, goal, ns)
            for node in ast.walk(st):
                if isinstance(node, (ast.Assign, ast.AugAssign)):
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                        _forget(t, ns)
    return False


def _contains(stmts, goal) -> bool:
    return any(goal is n for st in stmts for n in ast.walk(st))


def _range(node: ast.For, ns):
    it = node.iter
    if not (isinstance(it, ast.Call)):
        raise _Unknown("iterator")
    name = ast.unparse(it.func)
    if name not in ("range", "tl.range", "triton.language.range", "tl.static_range"):
        raise _Unknown(name)
    args = [_eval(a, ns) for a in it.args[:3]]
    if any(a is ANY for a in args):
        raise _Unknown("a range bound depends on data")
    return range(*(int(a) for a in args))


@functools.lru_cache(maxsize=None)
def _module_ast(path: str):
    with open(path) as f:
        tree = ast.parse(f.read())
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    fors = [(n, fn) for fn in functions.values() for n in ast.walk(fn) if isinstance(n, ast.For)]
    return functions, fors


def _namespace(launch: Launch, module) -> dict:
    ns = _Namespace((k, v) for k, v in vars(module).items() if isinstance(v, (int, float, bool)))
    ns.update({k: v for k, v in launch.args.items() if not isinstance(v, TensorArg)})
    ns.update({"tl": _TlStub(launch.grid), "range": range, "min": min, "max": max, "int": int,
               "triton": _TlStub(launch.grid)})
    return ns


def _calls(fn_node, name):
    return [n for n in ast.walk(fn_node) if isinstance(n, ast.Call)
            and ast.unparse(n.func).split(".")[-1] == name]


def _function_namespace(fn_name, functions, kernel_name, launch, module, depth=0):
    """The namespace on entry of ``fn_name``: the launch's arguments for the kernel; for a
    helper, its parameters bound from its first call in the kernel (or in a helper)."""
    if fn_name == kernel_name:
        return _namespace(launch, module)
    if depth > 3:
        raise _Unknown("call depth")
    for caller_name, caller in functions.items():
        for call in _calls(caller, fn_name):
            try:
                outer = _function_namespace(caller_name, functions, kernel_name, launch, module,
                                            depth + 1)
            except _Unknown:
                continue
            stmt = next(s for s in caller.body if any(call is n for n in ast.walk(s)))
            _walk_to(caller.body, stmt, outer)
            params = [a.arg for a in functions[fn_name].args.args]
            ns = _namespace(launch, module)
            for p in params:
                ns[p] = ANY
            for p, a in zip(params, call.args):
                try:
                    ns[p] = _eval(a, outer)
                except _Unknown:
                    pass
            for kw in call.keywords:
                try:
                    ns[kw.arg] = _eval(kw.value, outer)
                except _Unknown:
                    pass
            return ns
    raise _Unknown(f"no call of {fn_name}")


def _same_source(location: str, path: str, module_name: str) -> bool:
    """Whether a line-table file name is the kernel's module ``path``. Triton's cache is shared
    between checkouts and keyed on the kernels' source and starting lines, not on the file
    name: a cubin compiled from another copy of the package (a second checkout, an installed
    wheel; that file may be gone) carries that copy's file name with the same line numbers.
    So a name that ends with the module's package path (``pydistill/kernels/x.py``) is it."""
    try:
        if os.path.samefile(location, path):
            return True
    except OSError:
        pass
    depth = len(module_name.split("."))
    return Path(location).parts[-depth:] == Path(path).parts[-depth:]


def trip_count(loop_instrs: list, launch: Launch) -> tuple:
    """(trip count, Python ``for`` node) of the SASS loop whose own instructions are
    ``loop_instrs`` (module docstring); the count is None when its range cannot be evaluated,
    the node when no ``for`` statement holds the loop."""
    module = sys.modules[launch.fn.fn.__module__]
    path = inspect.getsourcefile(launch.fn.fn)
    functions, fors = _module_ast(path)
    same = functools.lru_cache(maxsize=None)(lambda f: _same_source(f, path, module.__name__))
    lines = [{ln for f, ln in ins.locations if same(f)} if ins.locations else set()
             for ins in loop_instrs]
    lines = [ls for ls in lines if ls]
    if not lines:
        return None, None
    best = None
    for node, fn in fors:
        inside = sum(1 for ls in lines if any(node.lineno <= ln <= node.end_lineno for ln in ls))
        if inside * 2 >= len(lines):
            span = node.end_lineno - node.lineno
            if best is None or span < best[0]:
                best = (span, node, fn)
    if best is None:
        return None, None
    _, node, fn = best
    try:
        ns = _function_namespace(fn.name, functions, launch.fn.fn.__name__, launch, module)
        if not _walk_to(fn.body, node, ns):
            return None, node
        return len(_range(node, ns)), node
    except (_Unknown, TypeError, ValueError):
        return None, node


# ---- the per-launch figures ------------------------------------------------------------


def _width(opcode: str) -> int:
    parts = opcode.split(".")
    for p in parts:
        if p == "128":
            return 16
        if p in ("64", "F64", "U64", "S64"):
            return 8
    for p in parts:
        if p in ("U16", "S16", "F16", "BF16"):
            return 2
        if p in ("U8", "S8"):
            return 1
    return 4


_GLOBAL = ("LDG", "STG", "ATOMG", "RED", "LDGSTS", "ATOM")


def _global_bytes(op: str) -> int:
    """Bytes one warp moves through global memory with ``op`` (every lane active)."""
    head = op.split(".")[0]
    if head in ("LDG", "STG", "ATOMG", "RED", "LDGSTS") or (head == "ATOM" and ".E." in op + "."):
        return 32 * _width(op)
    return 0


def _mma_flops(op: str) -> float:
    """Tensor-core FLOPs of one warp's instruction ``op``."""
    m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op)
    if m:
        a, b, c = (int(x) for x in m.groups())
        return 2.0 * a * b * c / 4  # a warp group's instruction, issued by its 4 warps
    m = re.match(r"HMMA\.(\d)(\d)(\d+)", op)
    if m:
        a, b, c = (int(x) for x in m.groups())
        return 2.0 * a * b * c
    return 0.0


def ptx_atomics(ptx: str) -> tuple:
    """(summary of the atomic / reduction instructions with their semantics and scope, number
    of fences) in the PTX."""
    kinds = defaultdict(int)
    for m in re.finditer(r"^\s*(?:@%p\d+\s+)?((?:atom|red)\.[\w.]+)", ptx, re.M):
        parts = m.group(1).split(".")
        sem = next((p for p in parts if p in ("relaxed", "acquire", "release", "acq_rel", "sc")), "plain")
        scope = next((p for p in parts if p in ("cta", "gpu", "sys", "cluster")), "gpu")
        op = next((p for p in parts if p in ("add", "max", "min", "exch", "cas", "and", "or", "xor",
                                             "inc", "dec")), "?")
        kinds[f"{parts[0]}.{op} {sem}.{scope}"] += 1
    fences = len(re.findall(r"^\s*(?:@%p\d+\s+)?(?:fence|membar)\.", ptx, re.M))
    summary = "; ".join(f"{k} x{v}" for k, v in sorted(kinds.items())) or "-"
    return summary, fences


def occupancy(regs: int, shared: int, num_warps: int, target: Target) -> tuple:
    """(resident CTAs per SM, what limits it)."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    warps_by_regs = (target.regs_per_sm // 4 // regs_per_warp) * 4
    limits = {  # in this order on a tie: a register count at the warp limit is not the limit
        "warps": target.max_warps_per_sm // num_warps,
        "ctas": target.max_ctas_per_sm,
        "shared": target.smem_per_sm // (shared + target.smem_reserved_per_cta),
        "registers": warps_by_regs // num_warps,
    }
    limiter = min(limits, key=lambda k: (limits[k], list(limits).index(k)))
    return limits[limiter], limiter


@dataclass
class Figures:
    kernel: str
    regs: int
    local_bytes: int
    spill_stores: int
    shared_bytes: int
    num_warps: int
    ctas_per_sm: int
    limiter: str
    mma: str
    atomics: str
    fences: int
    warp_instructions: float
    bytes_sass: float
    bytes_footprint: int
    flops: float
    unresolved_loops: int
    max_load_bytes: int  # the widest global load of one thread (16: 128-bit vector loads)
    loops: list = field(default_factory=list)  # (first line, trips, body instructions)

    @property
    def bytes(self) -> float:
        return min(self.bytes_sass, self.bytes_footprint) if self.bytes_footprint else self.bytes_sass

    def times(self, target: Target) -> dict:
        return {"memory": self.bytes / target.bandwidth,
                "issue": self.warp_instructions / target.issue_rate,
                "tensor": self.flops / target.tensor_flops}


def footprint(launch: Launch) -> int:
    """Bytes of the tensor arguments, each storage once at its largest view."""
    spans = {}
    for v in launch.args.values():
        if isinstance(v, TensorArg):
            spans[v.storage] = max(spans.get(v.storage, 0), v.footprint)
    return sum(spans.values())


def analyse(launch: Launch, target: Target) -> Figures:
    kernel = launch.kernel
    cubin = kernel.asm["cubin"]
    usage = _run_tool("cuobjdump", cubin, "-res-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    regs, stack, _static_shared, local = (int(x) for x in m.groups())
    instrs = parse_sass(_run_tool("nvdisasm", cubin, "-g", "-gi", "-c"))
    # executed count of each instruction per warp: the product of its loops' trip counts
    counts = [1.0] * len(instrs)
    unresolved, loops = 0, []
    spans = sass_loops(instrs)
    nodes = {}
    for lo, hi in spans:
        inner = [(a, b) for a, b in spans if (a, b) != (lo, hi) and lo <= a and b <= hi]
        own = [instrs[i] for i in range(lo, hi + 1)
               if not any(a <= i <= b for a, b in inner)]
        trips, node = trip_count(own, launch)
        nodes[lo, hi] = node
        outer = [(a, b) for a, b in spans if (a, b) != (lo, hi) and a <= lo and hi <= b]
        if node is not None and any(nodes.get(o) is node for o in outer):
            continue  # a copy of its enclosing loop's body (peeled or versioned), counted there
        if trips is None:
            unresolved += 1
            trips = 1
        first = min((ln for ins in own for _, ln in ins.locations), default=0)
        loops.append((first, trips, hi - lo + 1))
        for i in range(lo, hi + 1):
            counts[i] *= trips
    warps = kernel.metadata.num_warps * math.prod(launch.grid)
    per_warp = sum(c for c, ins in zip(counts, instrs) if not (ins.opcode == "BRA" and ins.target == ins.address))
    sass_bytes = sum(c * _global_bytes(ins.opcode) for c, ins in zip(counts, instrs))
    flops = sum(c * _mma_flops(ins.opcode) for c, ins in zip(counts, instrs))
    ops = {ins.opcode.split(".")[0] for ins in instrs}
    mma = "wgmma" if "HGMMA" in ops else "mma.sync" if "HMMA" in ops else "-"
    atomics, fences = ptx_atomics(kernel.asm["ptx"])
    shared = kernel.metadata.shared
    ctas, limiter = occupancy(regs, shared, kernel.metadata.num_warps, target)
    return Figures(
        kernel=kernel.metadata.name, regs=regs, local_bytes=max(local, stack),
        spill_stores=sum(1 for ins in instrs if ins.opcode.startswith("STL")), shared_bytes=shared,
        num_warps=kernel.metadata.num_warps, ctas_per_sm=ctas, limiter=limiter, mma=mma,
        atomics=atomics, fences=fences, warp_instructions=per_warp * warps,
        bytes_sass=sass_bytes * warps, bytes_footprint=footprint(launch),
        flops=flops * warps, unresolved_loops=unresolved, loops=loops,
        max_load_bytes=max((_width(ins.opcode) for ins in instrs
                            if ins.opcode.split(".")[0] in ("LDG", "LDGSTS")), default=0))


# --------------------------------------------------------------------------------------
# The CUDA C++ extension: resources only
# --------------------------------------------------------------------------------------

CUDA_FAMILY = "cuda-ext"


def nvcc_path() -> Optional[str]:
    """The nvcc of the toolkit the extension builds with (pydistill._cuda_ext.cuda_home)."""
    from pydistill import _cuda_ext

    home = _cuda_ext.cuda_home()
    path = os.path.join(home, "bin", "nvcc") if home else None
    return path if path and os.path.isfile(path) else None


def cuda_rows(target: Target, progress=None) -> list:
    """Registers, stack (local memory), spills and shared memory of every kernel of csrc/*.cu
    as ``nvcc --resource-usage`` reports them for ``target`` (the extension's own nvcc flags);
    CTAs per SM where the kernel declares its block size (``__launch_bounds__``). The launches
    are not captured: no time is predicted for them."""
    from pydistill import _cuda_ext

    nvcc = nvcc_path()
    if nvcc is None:
        return []
    import shutil

    filt = shutil.which("cu++filt", path=os.path.dirname(nvcc)) or shutil.which("c++filt")
    rows = []
    for source in sorted(_cuda_ext.CSRC.glob("*.cu")):
        if progress:
            progress(f"{CUDA_FAMILY} {source.name}")
        text = source.read_text()
        for header in re.findall(r'#include "([^"]+)"', text):
            if (source.parent / header).is_file():
                text += (source.parent / header).read_text()
        bounds = dict((name, int(n)) for n, name in
                      re.findall(r"__launch_bounds__\((\d+)[^)]*\)\s+(\w+)\s*\(", text))
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run(
                [nvcc, f"-arch=sm_{target.arch}a", "-cubin", *_cuda_ext.NVCC_FLAGS,
                 "--resource-usage", str(source), "-o", os.path.join(tmp, "k.cubin")],
                capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"nvcc failed on {source.name}: {out.stderr[-2000:]}")
        for block in re.split(r"ptxas info\s*: Compiling entry function ", out.stdout + out.stderr)[1:]:
            mangled = block.split("'")[1]
            name = subprocess.run([filt, mangled], capture_output=True, text=True).stdout.strip() \
                if filt else mangled
            name = re.sub(r"\(.*\)$", "", name.replace("pydistill::", "")).replace("__nv_bfloat16", "bf16")
            name = re.sub(r"^void ", "", name).replace("__half", "fp16").replace("<float", "<fp32").replace(
                ", float>", ", fp32>")
            num = lambda pattern: int(m.group(1)) if (m := re.search(pattern, block)) else 0  # noqa: E731
            regs, smem = num(r"Used (\d+) registers"), num(r"(\d+) bytes smem")
            base = re.sub(r"<.*", "", name).split("::")[-1].strip()
            threads = bounds.get(base)
            ctas, limiter = occupancy(regs, smem, threads // 32, target) if threads else ("", "")
            rows.append({
                "family": CUDA_FAMILY, "case": source.name, "phase": "-", "kernel": name,
                "num_warps": threads // 32 if threads else "", "regs": regs,
                "spill_stores": num(r"(\d+) bytes spill stores"),
                "local_bytes": num(r"(\d+) bytes stack frame"), "shared_bytes": smem,
                "ctas_per_sm": ctas, "limiter": limiter,
            })
    return rows


# --------------------------------------------------------------------------------------
# Rows, report, CLI
# --------------------------------------------------------------------------------------


def elements(case) -> int:
    """The case's unit of work for ``instructions_per_element``: logits (N V) or attention
    scores (B H L^2)."""
    if hasattr(case, "v"):
        return case.n * case.v
    return case.b * case.h * case.length * case.length


def floor_s(family: str, case, target: Target) -> float:
    """The family's fwd+bwd floor on ``target`` (module docstring)."""
    if family in GEMM_BOUND:
        return case.flops("fwd+bwd") / target.tensor_flops
    return case.floor_bytes("fwd+bwd") / target.bandwidth


def _bound(times: dict) -> str:
    return max(times, key=times.get)


def case_rows(sc: StaticCase, case, module, target: Target, cache: dict, label=None) -> list:
    capture = capture_case(sc, case, module, target)
    label = label or case_label(sc, case)
    n_elements = elements(case)
    rows, bound_time = [], defaultdict(float)
    for launch in capture.launches:
        key = (launch.kernel.hash, launch.grid,
               tuple(sorted((k, v) for k, v in launch.args.items() if not isinstance(v, TensorArg))),
               footprint(launch))
        fig = cache.get(key)
        if fig is None:
            fig = cache[key] = analyse(launch, target)
        times = fig.times(target)
        bound_time[_bound(times)] += max(times.values())
        rows.append({
            "family": sc.family, "case": label, "phase": launch.phase, "kernel": fig.kernel,
            "grid": "x".join(str(g) for g in launch.grid), "num_warps": fig.num_warps,
            "regs": fig.regs, "spill_stores": fig.spill_stores, "local_bytes": fig.local_bytes,
            "shared_bytes": fig.shared_bytes, "ctas_per_sm": fig.ctas_per_sm,
            "limiter": fig.limiter, "mma": fig.mma, "atomics": fig.atomics, "fences": fig.fences,
            "elements": n_elements, "warp_instructions": int(fig.warp_instructions),
            "instructions_per_element": fig.warp_instructions / n_elements,
            "bytes": int(fig.bytes), "bytes_sass": int(fig.bytes_sass),
            "bytes_footprint": fig.bytes_footprint, "max_load_bytes": fig.max_load_bytes,
            "flops": int(fig.flops),
            "unresolved_loops": fig.unresolved_loops, "predicted_ms": max(times.values()) * 1e3,
            "bound": _bound(times),
        })
    ops = defaultdict(lambda: [0, 0, 0.0, 0.0])  # count, bytes, flops, seconds
    for phase, name, moved, flops in capture.torch_ops:
        entry = ops[phase, name]
        t = max(moved / target.bandwidth, flops / target.tensor_flops)
        entry[0] += 1
        entry[1] += moved
        entry[2] += flops
        entry[3] += t
        bound_time["tensor" if flops / target.tensor_flops > moved / target.bandwidth else "memory"] += t
    for (phase, name), (count, moved, flops, seconds) in ops.items():
        rows.append({
            "family": sc.family, "case": label, "phase": phase, "kernel": f"torch.{name} x{count}",
            "elements": n_elements, "bytes": moved, "flops": int(flops),
            "predicted_ms": seconds * 1e3,
            "bound": "tensor" if flops / target.tensor_flops > moved / target.bandwidth else "memory",
        })
    total = sum(r["predicted_ms"] for r in rows)
    floor = floor_s(sc.family, case, target) * 1e3
    rows.append({
        "family": sc.family, "case": label, "phase": "fwd+bwd", "kernel": "total",
        "elements": n_elements,
        "warp_instructions": sum(r.get("warp_instructions") or 0 for r in rows),
        "bytes": sum(r["bytes"] for r in rows), "flops": sum(r["flops"] for r in rows),
        "unresolved_loops": sum(r.get("unresolved_loops") or 0 for r in rows),
        "predicted_ms": total, "bound": max(bound_time, key=bound_time.get) if bound_time else "-",
        "floor_ms": floor, "ratio": total / floor if floor else None,
    })
    return rows


# Families whose kernels run one program per row: their instructions per element do not
# depend on N, so --small runs them at SMALL_ROWS rows.
ROW_FAMILIES = ("softmax", "topk", "uld")
SMALL_ROWS = 64


def run_model(target: Target, families=None, small: bool = False, progress=None) -> list:
    """The rows of every goal case (``small``: the row families at SMALL_ROWS rows, labelled as
    their goal case, for the CI gate of tests/test_static.py)."""
    import dataclasses
    import importlib

    rows, cache = [], {}
    for sc in goal_cases(families):
        module = importlib.import_module(FAMILY_MODULES[sc.family])
        for case in family_cases(sc, module):
            label = case_label(sc, case)
            if small and sc.family in ROW_FAMILIES:
                case = dataclasses.replace(case, n=SMALL_ROWS)
            if progress:
                progress(f"{sc.family} {label}")
            rows += case_rows(sc, case, module, target, cache, label)
    return rows


def _fmt(value, spec=".3g"):
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def write_csv(rows, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k), ".6g") for k in CSV_COLUMNS})


def report(rows, target: Target, command: str) -> str:
    import triton

    totals = [r for r in rows if r["kernel"] == "total"]
    lines = [
        f"# Predicted lower bound from compiled code ({target.name}, {target.device})",
        "",
        "**Not a measurement.** Each Triton launch of a forward + backward at the goal shapes, "
        "compiled for the target through Triton's JIT with a stand-in driver; time of a launch = "
        "max(bytes / bandwidth, warp-instructions / issue rate, MMA FLOPs / tensor peak), the "
        "other aten ops (cuBLAS GEMMs, casts) at max(bytes / bandwidth, FLOPs / peak); summed. "
        "Method and its approximations: bench/static.py.",
        "",
        f"Constants: {target.constants()}.",
        f"Triton {triton.__version__}, torch {torch.__version__}, git {harness.git_revision()}. "
        f"Command: `{command}`.",
        "",
        "| family | case | floor ms | predicted ms | ratio | bound by | unresolved loops |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for r in totals:
        loops = int(r.get("unresolved_loops") or 0)
        mark = "*" if loops else ""
        lines.append(f"| {r['family']} | {r['case']} | {r['floor_ms']:.3g} | {r['predicted_ms']:.3g}{mark} | "
                     f"{r['ratio']:.2f}{mark} | {r['bound']} | {loops} |")
    unresolved = [r for r in totals if int(r.get("unresolved_loops") or 0)]
    if unresolved:
        lines += ["", "\\* lower bound: " + "; ".join(
            f"{r['family']} {r['case']}: {r['unresolved_loops']} loops unresolved" for r in unresolved)
            + ". A loop whose trip count the model cannot evaluate from the launch (a range that "
              "depends on loaded data) is counted as one trip: that case's instructions and time "
              "are a lower bound, not a prediction."]
    lines += ["", "## Kernels (one line per distinct launch; xN: launches)", "",
              "| family | case | phase | kernel | grid | regs | spills | CTAs/SM (limit) | mma | "
              "atomics / fences | instr / element | GB | TFLOP | predicted ms | bound |",
              "|---|---|---|---|---|---:|---:|---|---|---|---:|---:|---:|---:|---|"]
    groups = {}
    cuda = [r for r in rows if r["family"] == CUDA_FAMILY]
    rows = [r for r in rows if r["family"] != CUDA_FAMILY]
    for r in rows:
        if r["kernel"] == "total":
            continue
        aten = r["kernel"].startswith("torch.")
        kernel = "aten ops" if aten else r["kernel"]
        key = (r["family"], r["case"], r["phase"], kernel, r.get("grid"))
        g = groups.setdefault(key, dict(r, n=0, predicted_ms=0.0, bytes=0, flops=0, ops=[]))
        g["n"] += 0 if aten else 1
        g["predicted_ms"] += r["predicted_ms"]
        g["bytes"] += r["bytes"]
        g["flops"] += r["flops"]
        if aten:
            g["ops"].append((r["predicted_ms"], r["kernel"][len("torch."):]))
            g["bound"] = "tensor" if g["flops"] / target.tensor_flops > g["bytes"] / target.bandwidth else "memory"
    for (family, case, phase, kernel, grid), g in groups.items():
        name = kernel + (f" x{g['n']}" if g["n"] > 1 else "")
        if g["ops"]:
            top = sorted(g["ops"], reverse=True)
            name += " (" + ", ".join(op for _, op in top[:3]) + (", ..." if len(top) > 3 else "") + ")"
        compiled = g.get("regs") is not None
        lines.append(
            f"| {family} | {case} | {phase} | {name} | {grid or ''} | {_fmt(g.get('regs'))} | "
            f"{_fmt(g.get('spill_stores'))} | "
            + (f"{g['ctas_per_sm']} ({g['limiter']})" if compiled else "") + " | "
            + f"{g.get('mma') or ''} | "
            + (f"{g['atomics']} / {g['fences']}" if compiled else "") + " | "
            + f"{_fmt(g.get('instructions_per_element'))} | {g['bytes'] / 1e9:.3g} | "
            f"{g['flops'] / 1e12:.3g} | {g['predicted_ms']:.3g} | {g['bound']} |")
    if cuda:
        lines += ["", f"## CUDA C++ extension (nvcc --resource-usage, {target.name}; resources only, "
                      "no launch captured, no time predicted)", "",
                  "| source | kernel | regs | stack bytes | spill bytes | smem bytes | CTAs/SM (limit) |",
                  "|---|---|---:|---:|---:|---:|---|"]
        same = {}  # template instances with the same resources: one line
        for r in cuda:
            occ = f"{r['ctas_per_sm']} ({r['limiter']}, {r['num_warps']} warps)" if r["ctas_per_sm"] != "" else ""
            base, _, args = r["kernel"].partition("<")
            key = (r["case"], base, r["regs"], r["local_bytes"], r["spill_stores"], r["shared_bytes"], occ)
            same.setdefault(key, []).append("<" + args if args else "")
        for (source, base, regs, stack, spills, smem, occ), variants in same.items():
            shown = " ".join(variants[:4]) + (f" (+{len(variants) - 4})" if len(variants) > 4 else "")
            lines.append(f"| {source} | `{base}` {shown} | {regs} | {stack} | {spills} | {smem} | {occ} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m pydistill.bench.static",
        description="Predicted lower bound from compiled code of every Triton launch at the goal "
                    "shapes (no GPU needed; not a measurement).")
    p.add_argument("--target", default="sm_90", choices=sorted(TARGETS))
    p.add_argument("--family", nargs="+", choices=sorted(FAMILY_MODULES))
    p.add_argument("--small", action="store_true",
                   help=f"the row families at {SMALL_ROWS} rows (same instructions per element; "
                        "the CI gate)")
    p.add_argument("--no-cuda", action="store_true",
                   help="leave out the CUDA C++ extension's resource usage (nvcc, a few minutes)")
    p.add_argument("--out", type=Path, help="CSV file or folder (default: bench/results/"
                                            "static-<arch>.csv in a checkout); the Markdown "
                                            "report beside it")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    reason = triton_unsupported()
    if reason is not None:
        print(f"static model unavailable: {reason}", file=sys.stderr)
        return 2
    os.environ.setdefault("PYDISTILL_CUDA_JIT", "0")
    target = TARGETS[opts.target]
    out = harness.output_csv(opts.out, f"static-{opts.target.replace('_', '')}.csv")
    rows = run_model(target, opts.family, opts.small, progress=lambda s: print(f"  {s}", file=sys.stderr, flush=True))
    if not (opts.small or opts.no_cuda):
        rows += cuda_rows(target, progress=lambda s: print(f"  {s}", file=sys.stderr, flush=True))
    write_csv(rows, out)
    for r in rows:
        if r["kernel"] == "total" and int(r.get("unresolved_loops") or 0):
            print(f"warning: {r['family']} {r['case']}: {r['unresolved_loops']} loops unresolved, "
                  "counted as one trip (its prediction is a lower bound)", file=sys.stderr)
    command = "python -m pydistill.bench.static" + (" " + " ".join(argv) if argv else "")
    text = report(rows, target, command)
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --------------------------------------------------------------------------------------
# The CI gate (tests/test_static.py)
# --------------------------------------------------------------------------------------


def read_csv(path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def instructions_per_element(rows) -> dict:
    """(family, case, phase, kernel) -> warp-instructions per element, summed over the launches
    of each compiled kernel."""
    out = defaultdict(float)
    for r in rows:
        if r.get("warp_instructions") not in (None, "") and r["kernel"] != "total":
            out[r["family"], r["case"], r["phase"], r["kernel"]] += (
                float(r["warp_instructions"]) / float(r["elements"]))
    return dict(out)


def unresolved_loops(rows) -> dict:
    """(family, case, phase, kernel) -> unresolved loops of each compiled kernel (the most of
    any of its launches: a count per compiled code, not a rate)."""
    out = defaultdict(int)
    for r in rows:
        if r.get("unresolved_loops") not in (None, "") and r["kernel"] != "total" \
                and r.get("regs") not in (None, ""):
            key = (r["family"], r["case"], r["phase"], r["kernel"])
            out[key] = max(out[key], int(r["unresolved_loops"]))
    return dict(out)


def gate_failures(committed: list, current: list, tolerance: float = 0.10) -> list:
    """What the CI gate refuses in ``current`` (rows of this run) against ``committed`` (the
    rows of bench/results/static-sm90.csv): a kernel that spills or uses local memory, a
    kernel's instructions per element grown by more than ``tolerance``, a kernel with more
    unresolved loops than committed (each counts once: its instructions are then a lower bound,
    not a prediction), a case predicted faster than its floor (impossible: the model lost
    work), a kernel missing from either side (the committed report is then stale: regenerate
    it)."""
    failures = []
    for r in current:
        if r["kernel"] == "total" and r.get("floor_ms") not in (None, "") and float(r["floor_ms"]) > 0 \
                and float(r["predicted_ms"]) < float(r["floor_ms"]):
            failures.append(f"{r['family']} {r['case']}: predicted {float(r['predicted_ms']):.4g} ms, "
                            f"below its floor {float(r['floor_ms']):.4g} ms (work the model does not see: "
                            f"{r.get('unresolved_loops') or 0} unresolved loops)")
    old_loops, new_loops = unresolved_loops(committed), unresolved_loops(current)
    for key in sorted(set(old_loops) & set(new_loops)):
        if new_loops[key] > old_loops[key]:
            failures.append(f"{' '.join(key)}: {new_loops[key]} unresolved loops (committed: "
                            f"{old_loops[key]}), counted once each")
    for r in current:
        if r.get("regs") in (None, "") or r["family"] == CUDA_FAMILY:
            continue
        if int(r.get("spill_stores") or 0) or int(r.get("local_bytes") or 0):
            failures.append(f"{r['family']} {r['case']} {r['phase']} {r['kernel']}: "
                            f"{r['spill_stores']} spill stores, {r['local_bytes']} bytes of local memory")
    old, new = instructions_per_element(committed), instructions_per_element(current)
    for key in sorted(set(old) | set(new)):
        if key not in new or key not in old:
            where = "this run" if key not in new else "the committed report"
            failures.append(f"{' '.join(key)}: not in {where} (regenerate bench/results/static-*.csv "
                            "with python -m pydistill.bench.static)")
        elif new[key] > old[key] * (1 + tolerance):
            failures.append(f"{' '.join(key)}: {new[key]:.4g} warp-instructions per element, "
                            f"{new[key] / old[key] - 1:+.1%} over the committed {old[key]:.4g}")
    return failures

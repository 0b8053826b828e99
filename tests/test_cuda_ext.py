"""The CUDA C++ extension (csrc/, pydistill/_cuda_ext.py): it builds with the machine's CUDA
toolkit (no GPU needed), every op is registered with its schema, fake tensors propagate
shapes, torch.library.opcheck passes, torch.compile traces the ops, and a missing extension
is a clear error. The ops run here on CPU tensors through the host implementation of the
kernels' row code; with a GPU the same checks run on CUDA tensors, and the loss matrices of
test_softmax_divergence.py / test_topk_divergence.py run the ``cuda`` backend against the
float64 reference (on the CPU too, through the host implementation). The per-model logit
transforms (each model's scale and soft-cap, applied in every kernel path that loads logits and
in both gradients) are checked here against the reference, with tests that the comparison
rejects a kernel applying the wrong model's transform.

Skipped, with the reason, only where the extension cannot be built: no CUDA build of
PyTorch or no CUDA toolkit (nvcc). The first run on a machine compiles it (minutes, cached).
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import pydistill as pdl
from pydistill import _cuda_ext
from pydistill.reference import softmax_divergence as R
from pydistill.reference import topk_divergence as RT

from conftest import CUDA, DEVICE, cuda_extension_problem
from test_softmax_divergence import assert_close

_PROBLEM = _cuda_ext.toolchain_problem() if _cuda_ext._prebuilt() is None else None
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=f"cannot build the CUDA extension: {_PROBLEM}")


@pytest.fixture(scope="module")
def ops():
    problem = cuda_extension_problem()
    assert problem is None, f"the toolchain is here but the extension did not build or load: {problem}"
    return torch.ops.pydistill


_KD_TRANSFORMS = ("float student_scale, float? student_softcap, float teacher_scale, "
                  "float? teacher_softcap")
SCHEMAS = {
    "kd_fwd": "pydistill::kd_fwd(Tensor student, Tensor teacher, Tensor? labels, int divergence, "
              "float temperature, float beta, float hard_weight, float soft_scale, "
              f"{_KD_TRANSFORMS}, int ignore_index) -> (Tensor, Tensor)",
    "kd_bwd": "pydistill::kd_bwd(Tensor grad_rows, Tensor student, Tensor teacher, Tensor? labels, "
              "Tensor stats, int divergence, float temperature, float beta, float hard_weight, "
              f"float soft_scale, {_KD_TRANSFORMS}, int ignore_index, bool grad_student, "
              "bool grad_teacher) -> (Tensor, Tensor)",
    "kd_fwd_grad": "pydistill::kd_fwd_grad(Tensor student, Tensor teacher, Tensor? labels, "
                   "Tensor row_scale, int divergence, float temperature, float beta, "
                   f"float hard_weight, float soft_scale, {_KD_TRANSFORMS}, int ignore_index, "
                   "bool grad_student, bool grad_teacher) -> (Tensor, Tensor, Tensor)",
    "kd_scale_grad_": "pydistill::kd_scale_grad_(Tensor(a!) grad, Tensor scale) -> ()",
    "topk_fwd": "pydistill::topk_fwd(Tensor student, Tensor teacher_logprobs, "
                "Tensor teacher_indices, Tensor? labels, int divergence, int tail, "
                "float temperature, float teacher_power, float beta, float hard_weight, "
                "float soft_scale, float student_scale, float? student_softcap, "
                "int ignore_index) -> (Tensor, Tensor)",
    "topk_bwd": "pydistill::topk_bwd(Tensor grad_rows, Tensor student, Tensor teacher_logprobs, "
                "Tensor teacher_indices, Tensor? labels, Tensor stats, int divergence, int tail, "
                "float temperature, float teacher_power, float beta, float hard_weight, "
                "float soft_scale, float student_scale, float? student_softcap, "
                "int ignore_index) -> Tensor",
}


def test_every_op_is_registered_with_its_schema(ops):
    for name, schema in SCHEMAS.items():
        assert str(getattr(ops, name).default._schema) == schema
    dispatch_keys = ("CPU", "CUDA")
    for name in SCHEMAS:
        for key in dispatch_keys:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pydistill::{name}", key), (name, key)


def _cuobjdump():
    # the toolkit's, else the one Triton's NVIDIA backend ships
    here = os.path.join(_cuda_ext.cuda_home() or "/usr/local/cuda", "bin", "cuobjdump")
    if os.path.exists(here):
        return here
    try:
        import triton
    except ImportError:
        return None
    there = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return there if os.path.exists(there) else None


def test_the_extension_is_built_for_sm80_and_sm90(ops):
    # the loaded library's fatbinary: code for both default architectures, and the Hopper
    # cluster kernel with a body (registers, shared memory) only in the sm_90 code
    tool, lib = _cuobjdump(), str(_cuda_ext._state["loaded"])
    if tool is None or not lib.endswith(".so"):
        pytest.skip("no cuobjdump, or the library is not a file")
    arches = os.environ.get("TORCH_CUDA_ARCH_LIST", _cuda_ext.DEFAULT_ARCH_LIST)
    if arches != _cuda_ext.DEFAULT_ARCH_LIST:
        pytest.skip(f"built for TORCH_CUDA_ARCH_LIST={arches}")
    out = subprocess.run([tool, "-res-usage", lib], capture_output=True, text=True, check=True).stdout
    usage, arch, function = {}, None, None
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("arch = sm_"):
            arch = line.split("sm_")[1]
        elif line.startswith("Function "):
            function = line[len("Function "):].rstrip(":")
        elif line.startswith("REG:") and function:
            fields = dict(f.split(":", 1) for f in line.split())
            usage[(arch, function)] = (int(fields["REG"]), int(fields["SHARED"]))
    assert {a for a, _ in usage} == {"80", "90"}, sorted({a for a, _ in usage})
    # divergence (6) x dtype (3); kd_kernel also x its variant (3: KDVariant in kd_row.cuh)
    for name, count in (("kd_kernel", 54), ("topk_kernel", 18), ("kd_cluster_kernel", 18)):
        for arch in ("80", "90"):
            assert sum(1 for a, f in usage if a == arch and name in f) == count, (name, arch)
    for (arch, function), (regs, shared) in usage.items():
        if "kd_cluster_kernel" in function and arch == "90":
            assert regs > 16 and shared > 1024, (function, regs, shared)
        elif "kd_cluster_kernel" in function:
            assert shared == 0, (function, regs, shared)


# ------------------------------------------------------------------------------------------
# fake tensors: shapes without running a kernel (what torch.compile traces)
# ------------------------------------------------------------------------------------------


def _kd_args():
    return (0, 2.0, 0.5, 0.3, 4.0, 0.5, None, 1.7, 30.0, -100)


def test_fake_tensor_shape_propagation(ops):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        s = torch.empty(2, 3, 507, dtype=torch.bfloat16, device="cuda")
        t = torch.empty(2, 3, 507, dtype=torch.bfloat16, device="cuda")
        y = torch.empty(2, 3, dtype=torch.long, device="cuda")
        rows, stats = ops.kd_fwd(s, t, y, *_kd_args())
        assert rows.shape == (6,) and rows.dtype == torch.float32 and rows.device.type == "cuda"
        assert stats.shape == (6, 8) and stats.dtype == torch.float32
        gs, gt = ops.kd_bwd(rows, s, t, y, stats, *_kd_args(), True, False)
        assert gs.shape == s.shape and gs.dtype == torch.bfloat16 and gt.shape == (0,)
        rows2, gs2, gt2 = ops.kd_fwd_grad(s, t, y, rows, *_kd_args(), True, True)
        assert rows2.shape == (6,) and gs2.shape == s.shape and gt2.shape == t.shape
        lp = torch.empty(6, 16, device="cuda")
        idx = torch.empty(6, 16, dtype=torch.long, device="cuda")
        rows, stats = ops.topk_fwd(s, lp, idx, y, 0, 0, 2.0, 1.0, 0.5, 0.3, 4.0, 1.7, None, -100)
        assert rows.shape == (6,) and stats.shape == (6, 8)
        g = ops.topk_bwd(rows, s, lp, idx, y, stats, 0, 0, 2.0, 1.0, 0.5, 0.3, 4.0, 1.7, None, -100)
        assert g.shape == s.shape and g.dtype == torch.bfloat16


def test_losses_trace_with_fake_cuda_tensors(ops):
    # the public functions on fake CUDA tensors: dispatch and reductions, no kernel (the
    # backward needs a device for autograd's engine: test_torch_compile_matches_eager traces it)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        s = torch.empty(4, 1000, dtype=torch.float16, device="cuda", requires_grad=True)
        t = torch.empty(4, 1000, dtype=torch.float16, device="cuda")
        loss = pdl.kd_loss(s, t, divergence="jsd", reduction="none", backend="cuda")
        assert loss.shape == (4,) and loss.dtype == torch.float32 and loss.requires_grad
        lp = torch.empty(4, 8, device="cuda")
        idx = torch.empty(4, 8, dtype=torch.long, device="cuda")
        loss = pdl.topk_kd_loss(s, lp, idx, backend="cuda", teacher_temperature=1.0)
        assert loss.shape == ()


# ------------------------------------------------------------------------------------------
# opcheck: schema, fake vs real, autograd registration, AOT dispatch (host implementation on
# CPU tensors; CUDA tensors with a GPU)
# ------------------------------------------------------------------------------------------


def _inputs(dtype=torch.float32, shape=(3, 2, 67), seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g) * 2).to(dtype=dtype, device=DEVICE)
    t = (torch.randn(shape, generator=g) * 2).to(dtype=dtype, device=DEVICE)
    y = torch.randint(0, shape[-1], shape[:-1], generator=g).to(DEVICE)
    y.view(-1)[1] = -100
    return s, t, y


@pytest.mark.parametrize("divergence", [0, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_kd(ops, divergence, dtype):
    s, t, y = _inputs(dtype)
    # student and teacher transforms that differ: scale and soft-cap on each side
    args = (divergence, 1.5, 0.3, 0.2, 2.25, 0.5, 4.0, 1.7, 6.0, -100)
    torch.library.opcheck(ops.kd_fwd.default, (s.requires_grad_(), t.requires_grad_(), y) + args)
    torch.library.opcheck(ops.kd_fwd.default, (s.detach(), t.detach(), None) + args[:3]
                          + (0.0, 1.0, 1.0, None, 1.0, None, -100))
    rows, stats = ops.kd_fwd(s.detach(), t.detach(), y, *args)
    grad_rows = torch.rand(rows.shape, device=DEVICE)
    torch.library.opcheck(ops.kd_bwd.default, (grad_rows, s.detach(), t.detach(), y, stats) + args + (True, True))
    torch.library.opcheck(ops.kd_fwd_grad.default, (s.detach(), t.detach(), y, grad_rows) + args + (True, False))
    g = torch.randn(s.shape, device=DEVICE).to(dtype)
    torch.library.opcheck(ops.kd_scale_grad_.default, (g, grad_rows))


@pytest.mark.parametrize("tail", [0, 1, 2])
def test_opcheck_topk(ops, tail):
    s, _, y = _inputs(torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    lp, idx = torch.log_softmax(torch.randn(6, 67, generator=g) * 3, -1).topk(9, dim=-1)
    idx, order = idx.sort(-1)
    lp, idx = lp.gather(-1, order).to(DEVICE), idx.to(DEVICE)
    args = (4, tail, 1.5, 0.8, 0.3, 0.2, 2.25, 1.7, 4.0, -100)
    torch.library.opcheck(ops.topk_fwd.default, (s.requires_grad_(), lp, idx, y) + args)
    rows, stats = ops.topk_fwd(s.detach(), lp, idx, y, *args)
    torch.library.opcheck(ops.topk_bwd.default, (torch.rand(6, device=DEVICE), s.detach(), lp, idx, y, stats) + args)


# ------------------------------------------------------------------------------------------
# the backend through the public API
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_matches_eager(ops, reduction):
    s, t, y = _inputs(torch.float32, (4, 130), seed=5)
    kw = dict(divergence="skew_kl", temperature=2.0, beta=0.1, hard_weight=0.5, reduction=reduction,
              backend="cuda")

    def loss_fn(a, b, labels):
        return pdl.kd_loss(a, b, labels=labels, **kw).sum()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=False)
    a1, a2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    l1, l2 = loss_fn(a1, t, y), compiled(a2, t, y)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l2, l1)
    torch.testing.assert_close(a2.grad, a1.grad)


@pytest.mark.parametrize("mode", ["recompute", "forward"])
def test_grad_schedules_agree(ops, mode, monkeypatch):
    monkeypatch.setenv("PYDISTILL_KD_GRAD", mode)
    s, t, y = _inputs(torch.bfloat16, (3, 4, 1000), seed=7)
    x = s.clone().requires_grad_()
    u = t.clone().requires_grad_()
    loss = pdl.kd_loss(x, u, labels=y, divergence="tvd", temperature=2.0, hard_weight=0.3,
                       softcap=20.0, backend="cuda")
    (loss * 0.7).backward()
    cfg = pdl.functional.kd_config(divergence="tvd", temperature=2.0, hard_weight=0.3, softcap=20.0)
    s64, t64 = s.double().requires_grad_(), t.double().requires_grad_()
    (R.kd_loss(s64, t64, y, cfg) * 0.7).backward()
    torch.testing.assert_close(loss.double(), R.kd_loss(s.double(), t.double(), y, cfg), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), s64.grad, rtol=2**-6, atol=1e-6)
    torch.testing.assert_close(u.grad.double(), t64.grad, rtol=2**-6, atol=1e-6)


def test_misaligned_rows_take_the_scalar_path(ops):
    # V = 131 bf16: every row starts at a different offset within a 16-byte vector, and the
    # sliced student disagrees with its contiguous gradient: scalar and vector paths both run
    g = torch.Generator().manual_seed(11)
    base = (torch.randn(5, 132, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    s = base[:, 1:]
    t = (torch.randn(5, 131, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    x = s.clone().requires_grad_()  # contiguous, V = 131
    for student in (s.detach().requires_grad_(), x):
        loss = pdl.kd_loss(student, t, divergence="reverse_kl", backend="cuda")
        (grad,) = torch.autograd.grad(loss, student)
        s64 = s.double().requires_grad_()
        want = R.kd_loss(s64, t.double(), None, R.KDConfig(divergence="reverse_kl"))
        (want_grad,) = torch.autograd.grad(want, s64)
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), want_grad, rtol=2**-7, atol=1e-7)


def test_mixed_dtypes_run_in_float32(ops):
    s, t, _ = _inputs(torch.bfloat16, (3, 50), seed=12)
    x = s.clone().requires_grad_()
    u = t.float().requires_grad_()
    loss = pdl.kd_loss(x, u, backend="cuda")
    loss.backward()
    assert x.grad.dtype == torch.bfloat16 and u.grad.dtype == torch.float32
    want = R.kd_loss(s.double(), t.double(), None, R.KDConfig())
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


def test_float64_is_refused_with_the_dtypes_it_takes(ops):
    x = torch.randn(2, 5, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match=r"backend='cuda'.*float64"):
        pdl.kd_loss(x, x, backend="cuda")


def test_topk_k_limit(ops):
    s = torch.randn(1, 5000, device=DEVICE)
    lp, idx = torch.log_softmax(s, -1).topk(4097, dim=-1)
    with pytest.raises(ValueError, match=r"K <= 4096.*backend='torch'"):
        pdl.topk_kd_loss(s, lp, idx, backend="cuda", teacher_temperature=1.0)


# ------------------------------------------------------------------------------------------
# per-model logit transforms z = cap(scale * logits), each model its own: the kernels (kd_row,
# topk_row; on sm_90 the cluster kernel too) against the float64 reference, by the suite's
# tolerance (test_softmax_divergence.assert_close: 4x the float32 reference's own error plus
# the output's rounding), both gradient schedules, every divergence
# ------------------------------------------------------------------------------------------

# name: (API keyword arguments, logit magnitude, extreme: columns masked with -inf, and the
# teacher's scaled logits tracking the student's, as in test_softmax_divergence's
# test_extreme_logits: an unrelated teacher at these magnitudes makes every row's student
# one-hot and D hundreds of nats, whose float32 rounding (eps D) then exceeds a true gradient of
# 0). Their temperature is 2, whose inverse is exact: the kernels scale by 1 / T, one rounding
# more than the reference's z / T, which at |z / T| ~ 30 is a few 1e-6 of p - q where the
# teacher tracks the student (test_extreme_logits runs at T = 1 for the same reason).
KD_TRANSFORMS = {
    "scales": (dict(student_logit_scale=0.0625, teacher_logit_scale=1.7), 3.0, False),
    "student_cap": (dict(student_softcap=2.5), 3.0, False),
    "teacher_cap": (dict(teacher_softcap=2.5), 3.0, False),
    "caps_and_scales": (dict(student_logit_scale=0.5, teacher_logit_scale=1.7, student_softcap=30.0,
                             teacher_softcap=50.0), 40.0, False),
    "extreme_scaled": (dict(temperature=2.0, student_logit_scale=1.7, teacher_logit_scale=0.0625),
                       1e4, True),
    "extreme_capped": (dict(temperature=2.0, student_logit_scale=1.7, teacher_logit_scale=0.0625,
                            student_softcap=30.0, teacher_softcap=50.0), 1e4, True),
    "hard_t2": (dict(hard_weight=0.4, temperature=2.0, reduction="mean", student_logit_scale=1.7,
                     teacher_logit_scale=0.0625, student_softcap=4.0), 3.0, False),
    "hard_t1": (dict(hard_weight=0.4, temperature=1.0, reduction="sum", student_logit_scale=0.0625,
                     teacher_softcap=3.0), 3.0, True),
}
_MASKED = [0, 5, 66]  # -inf in student and teacher alike (a masked vocabulary)
_DEFAULTS = dict(temperature=1.5, beta=0.3, reduction="none")  # what a case does not set


def _transform_inputs(kw, magnitude, extreme, shape=(3, 2, 67), dtype=torch.float32, seed=21):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g) * magnitude + torch.randn(shape[:-1] + (1,), generator=g)
    t = torch.randn(shape, generator=g) * magnitude
    if extreme:
        a_s, a_t = kw.get("student_logit_scale", 1.0), kw.get("teacher_logit_scale", 1.0)
        t = s * (a_s / a_t) + t * (3.0 / (magnitude * a_t))
    y = torch.randint(6, shape[-1] - 1, shape[:-1], generator=g)  # never a masked column
    y.view(-1)[2] = -100
    if extreme:
        s[..., _MASKED] = -math.inf
        t[..., _MASKED] = -math.inf
    return s.to(dtype=dtype, device=DEVICE), t.to(dtype=dtype, device=DEVICE), y.to(DEVICE)


def _kd_reference(s, t, y, cfg, grad_out, dtype):
    a, b = s.detach().to(dtype).requires_grad_(), t.detach().to(dtype).requires_grad_()
    loss = R.kd_loss(a, b, y, cfg)
    ga, gb = torch.autograd.grad(loss, [a, b], grad_out.to(dtype), allow_unused=True)
    return (loss.detach(), torch.zeros_like(a) if ga is None else ga,
            torch.zeros_like(b) if gb is None else gb)


def _check_kd_transform(s, t, y, kw, ref_kw=None):
    """kd_loss(backend='cuda') with ``kw`` against the reference of KDConfig(**ref_kw)
    (default: the same), value and both gradients, for a grad_output != 1."""
    x, u = s.clone().requires_grad_(), t.clone().requires_grad_()
    loss = pdl.kd_loss(x, u, labels=y, backend="cuda", **kw)
    grad_out = torch.rand(loss.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE) + 0.5
    gs, gt = torch.autograd.grad(loss, [x, u], grad_out)
    cfg = R.KDConfig(**(kw if ref_kw is None else ref_kw))
    want = _kd_reference(s, t, y, cfg, grad_out, torch.float64)
    ref32 = _kd_reference(s, t, y, cfg, grad_out, torch.float32)
    assert_close("loss", loss.detach(), want[0], [ref32[0]], loss.dtype, atol=1e-7)
    assert_close("grad student", gs, want[1], [ref32[1]], s.dtype)
    assert_close("grad teacher", gt, want[2], [ref32[2]], t.dtype)


def _kd_case(name, divergence):
    kw, magnitude, extreme = KD_TRANSFORMS[name]
    inputs = _transform_inputs(kw, magnitude, extreme)
    return dict(_DEFAULTS, divergence=divergence, **kw), inputs


@pytest.mark.parametrize("mode", ["recompute", "forward"])
@pytest.mark.parametrize("divergence", R.DIVERGENCES)
@pytest.mark.parametrize("case", list(KD_TRANSFORMS))
def test_kd_logit_transforms_match_reference(ops, case, divergence, mode, monkeypatch):
    monkeypatch.setenv("PYDISTILL_KD_GRAD", mode)
    kw, (s, t, y) = _kd_case(case, divergence)
    _check_kd_transform(s, t, y, kw)


@pytest.mark.parametrize("divergence", ["kl", "jsd", "skew_reverse_kl"])
@pytest.mark.parametrize("case", ["caps_and_scales", "extreme_capped", "hard_t2"])
def test_kd_logit_transforms_bfloat16(ops, case, divergence):
    kw, magnitude, extreme = KD_TRANSFORMS[case]
    inputs = _transform_inputs(kw, magnitude, extreme, dtype=torch.bfloat16)
    _check_kd_transform(*inputs, dict(_DEFAULTS, divergence=divergence, **kw))


def _swapped(kw):
    """The same transforms with student and teacher exchanged."""
    out, default = dict(kw), R.KDConfig()
    for a, b in (("student_logit_scale", "teacher_logit_scale"),
                 ("student_softcap", "teacher_softcap")):
        out[a], out[b] = kw.get(b, getattr(default, b)), kw.get(a, getattr(default, a))
    return out


@pytest.mark.parametrize("mode", ["recompute", "forward"])
@pytest.mark.parametrize("case", ["scales", "student_cap", "teacher_cap", "caps_and_scales",
                                  "hard_t2"])
def test_kd_logit_transforms_are_per_model(ops, case, mode, monkeypatch):
    # the comparison above can fail: against the reference of the swapped transforms (or of no
    # transform at all) the same kernel output is rejected, while the swapped call itself agrees
    monkeypatch.setenv("PYDISTILL_KD_GRAD", mode)
    kw, (s, t, y) = _kd_case(case, "jsd")
    swapped = _swapped(kw)
    assert swapped != kw
    _check_kd_transform(s, t, y, swapped)
    plain = {k: v for k, v in kw.items() if "scale" not in k and "softcap" not in k}
    for wrong in (swapped, plain):
        with pytest.raises(pytest.fail.Exception):
            _check_kd_transform(s, t, y, kw, ref_kw=wrong)


def test_kd_op_refuses_bad_transforms(ops):
    s, t, y = _inputs(torch.float32, (2, 9))
    base = [0, 1.0, 0.5, 0.0, 1.0, 1.0, None, 1.0, None, -100]
    for i, value, what in ((5, 0.0, "student_scale"), (7, -1.0, "teacher_scale"),
                           (8, 0.0, "teacher_softcap"), (6, math.inf, "student_softcap")):
        args = list(base)
        args[i] = value
        with pytest.raises(RuntimeError, match=f"{what}: expected"):
            ops.kd_fwd(s, t, y, *args)


# top-k: the student's transform only (the teacher arrives as log-probabilities)
TOPK_TRANSFORMS = {
    "scale": (dict(student_logit_scale=0.0625), 3.0, False),
    "scale_and_cap": (dict(student_logit_scale=1.7, student_softcap=4.0), 3.0, False),
    "extreme_capped": (dict(student_logit_scale=1.7, student_softcap=30.0), 1e4, True),
    "extreme_scaled": (dict(student_logit_scale=0.0625), 1e4, True),
    "hard": (dict(hard_weight=0.4, temperature=2.0, teacher_temperature=1.5, reduction="mean",
                  student_logit_scale=1.7, student_softcap=4.0), 3.0, False),
}


def _topk_inputs(magnitude, masked, shape=(3, 2, 67), k=9, seed=31):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g) * magnitude
    t = torch.randn(shape, generator=g) * 3.0
    lp, idx = torch.log_softmax(t.double(), -1).topk(k, dim=-1)
    order = torch.rand(lp.shape, generator=g).argsort(-1)  # the op sorts by id itself
    lp, idx = lp.gather(-1, order).float(), idx.gather(-1, order)
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    y.view(-1)[2] = -100
    if masked:  # -inf at the teacher's three least likely tokens: never on the support
        s.scatter_(-1, t.argsort(-1)[..., :3], -math.inf)
    return s.to(DEVICE), lp.to(DEVICE), idx.to(DEVICE), y.to(DEVICE)


def _topk_reference(s, lp, idx, y, cfg, grad_out, dtype):
    a = s.detach().to(dtype).requires_grad_()
    loss = RT.topk_kd_loss(a, lp.to(dtype), idx, y, cfg)
    if not loss.requires_grad:
        return loss.detach(), torch.zeros_like(a)
    (ga,) = torch.autograd.grad(loss, a, grad_out.to(dtype))
    return loss.detach(), ga


def _check_topk_transform(s, lp, idx, y, kw, ref_kw=None):
    x = s.clone().requires_grad_()
    loss = pdl.topk_kd_loss(x, lp, idx, labels=y, backend="cuda", **kw)
    grad_out = torch.rand(loss.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE) + 0.5
    (gs,) = torch.autograd.grad(loss, x, grad_out)
    cfg = RT.TopKConfig(**(kw if ref_kw is None else ref_kw))
    want = _topk_reference(s, lp, idx, y, cfg, grad_out, torch.float64)
    ref32 = _topk_reference(s, lp, idx, y, cfg, grad_out, torch.float32)
    assert_close("loss", loss.detach(), want[0], [ref32[0]], loss.dtype, atol=1e-7)
    assert_close("grad student", gs, want[1], [ref32[1]], s.dtype)


def _topk_case(name, divergence, tail):
    kw, magnitude, masked = TOPK_TRANSFORMS[name]
    kw = dict(_DEFAULTS, divergence=divergence, tail=tail, **kw)
    kw.setdefault("teacher_temperature", kw["temperature"])  # stored at T: no re-tempering
    return kw, _topk_inputs(magnitude, masked)


@pytest.mark.parametrize("tail", RT.TAILS)
@pytest.mark.parametrize("divergence", R.DIVERGENCES)
@pytest.mark.parametrize("case", list(TOPK_TRANSFORMS))
def test_topk_logit_transform_matches_reference(ops, case, divergence, tail):
    kw, inputs = _topk_case(case, divergence, tail)
    _check_topk_transform(*inputs, kw)


@pytest.mark.parametrize("tail", RT.TAILS)
@pytest.mark.parametrize("case", ["scale", "scale_and_cap", "hard"])
def test_topk_logit_transform_can_fail(ops, case, tail):
    kw, inputs = _topk_case(case, "jsd", tail)
    plain = {k: v for k, v in kw.items() if not k.startswith("student_")}
    with pytest.raises(pytest.fail.Exception):
        _check_topk_transform(*inputs, kw, ref_kw=plain)


# ------------------------------------------------------------------------------------------
# without the extension
# ------------------------------------------------------------------------------------------


def test_missing_extension_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_cuda_ext, "_state", {"loaded": None, "error": "unset", "tried": False})
    monkeypatch.setattr(_cuda_ext, "_prebuilt", lambda: None)
    monkeypatch.setenv("PYDISTILL_CUDA_JIT", "0")
    s = torch.randn(2, 5, device=DEVICE)
    with pytest.raises(ValueError, match=r"backend='cuda'.*not built.*pip install -e \. --no-build-isolation"):
        pdl.kd_loss(s, s, backend="cuda")
    monkeypatch.setenv("PYDISTILL_CUDA_JIT", "1")
    monkeypatch.setattr(_cuda_ext, "toolchain_problem", lambda: "no CUDA toolkit found (test)")
    with pytest.raises(ValueError, match=r"not built and cannot be built here: no CUDA toolkit"):
        pdl.topk_kd_loss(s, s[:, :2].log_softmax(-1), torch.tensor([[0, 1], [2, 3]], device=DEVICE), backend="cuda",
                         teacher_temperature=1.0)
    # auto never builds and never picks it
    assert pdl.resolve_backend("kd_loss", s) in ("triton", "torch")


def test_import_needs_no_extension():
    code = ("import pydistill, torch; x = torch.randn(2, 5); "
            "print(float(pydistill.kd_loss(x, x, backend='torch')))")
    env = dict(os.environ, PYDISTILL_CUDA_JIT="0", CUDA_HOME="/nonexistent")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert math.isclose(float(out.stdout.split()[-1]), 0.0, abs_tol=1e-6)


@pytest.mark.skipif(not CUDA, reason="the cluster kernel needs a GPU (sm_90)")
@pytest.mark.parametrize("divergence", ["kl", "jsd"])
@pytest.mark.parametrize("vocab", [128_256, 32_000])
def test_cluster_kernel_matches_portable(ops, divergence, vocab, monkeypatch):
    # gradient in the forward: the sm_90 cluster kernel where it applies, else the portable
    # one; PYDISTILL_NO_CLUSTER=1 forces the portable kernel
    monkeypatch.setenv("PYDISTILL_KD_GRAD", "forward")
    s, t, y = _inputs(torch.bfloat16, (64, vocab), seed=13)
    out = {}
    for no_cluster in ("", "1"):
        if no_cluster:
            monkeypatch.setenv("PYDISTILL_NO_CLUSTER", "1")
        x = s.clone().requires_grad_()
        loss = pdl.kd_loss(x, t, labels=y, divergence=divergence, temperature=2.0, hard_weight=0.1,
                           backend="cuda")
        loss.backward()
        out[no_cluster] = (loss.detach(), x.grad)
    torch.testing.assert_close(out[""][0], out["1"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[""][1].float(), out["1"][1].float(), rtol=2**-7, atol=1e-9)

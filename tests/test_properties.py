"""Property-based campaign: every logit and attention loss, on every backend that runs here,
against the float64 reference (pydistill/reference/), over what the fixed cases of the family
files do not reach:

* layouts: each tensor argument (logits, hidden states, weights, labels, top-k ids and
  log-probs, queries and keys) as a transposed, permuted, expanded (stride 0) or sliced view
  (every other element of a larger buffer whose gaps hold NaN, so a kernel that reads them
  fails), or contiguous;
* values: -inf entries, huge finite ones (1e30 up to the dtype's largest), tiny and subnormal
  ones, the bfloat16 / float16 ranges, NaN in rows that labels ignore (and only there);
* options: every divergence, beta at and within 1e-9 of 0 and 1, temperatures from 0.05 to
  1e4, hard labels, ignored rows, soft-caps and logit scales, every reduction, grad_output != 1.

Tolerances are the family files' (test_softmax_divergence.assert_close: 4x the error of float32
PyTorch on the same input plus the output dtype's rounding; the float32 references run on
contiguous copies, so they measure precision, not the layout), with two rules added:

* Non-finite results: where the float64 loss of a row is +inf the backend's is +inf (NaN never
  stands for an infinity). Rows with an infinite loss have no gradient to compare; every other
  row's gradient is compared. A float64 loss beyond float32's range must come back +inf.
* Large temperatures: float32 PyTorch itself loses the loss value as T^2 eps there (its error is
  no yardstick), so the loss is held to a relative error of 1e-6 T (an accurate float32 sum,
  e.g. of the differences of the tempered log-probabilities with expm1 / log1p, reaches
  ~1e-8 T on these inputs); gradients keep the usual rule.

Hypothesis runs derandomized (CI reproducible), without deadlines; PYDISTILL_PROPERTY_SCALE
multiplies every example budget (the Triton interpreter's budgets are a quarter of the
others': ~0.5 s a call). Shapes stay tiny: V <= 64, one property at V ~ 300.
"""
import contextlib
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pydistill as pdl
from pydistill.reference import attention_kd as RA
from pydistill.reference import linear_kd as RL
from pydistill.reference import softmax_divergence as RK
from pydistill.reference import topk_divergence as RT
from pydistill.reference import uld as RU

import test_attention_kd as TA
import test_linear_kd as TL
import test_softmax_divergence as TS
import test_topk_divergence as TT
import test_uld as TU
from conftest import DEVICE, available_backends

DIVERGENCES = list(RK.DIVERGENCES)
TAILS = list(RT.TAILS)
SCALE = int(os.environ.get("PYDISTILL_PROPERTY_SCALE", "1"))
PROFILE = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.filter_too_much])
FLOAT32_MAX = torch.finfo(torch.float32).max


def run_property(backend, strategy, check, examples):
    """Run ``check(backend, case)`` over ``examples`` cases drawn from ``strategy`` (a quarter of
    them under the Triton interpreter)."""
    budget = examples * SCALE
    if backend == "triton" and TS.INTERPRETED:
        budget = max(3, budget // 4)

    @settings(PROFILE, max_examples=budget)
    @given(case=strategy)
    def prop(case):
        check(backend, case)

    prop()


@contextlib.contextmanager
def tiles(backend, module, name="BLOCK_V_OVERRIDE", value=16):
    """Small Triton tiles (multi-tile rows at tiny V) for the duration of one example."""
    if backend != "triton":
        yield
        return
    import importlib

    kernels = importlib.import_module(f"pydistill.kernels.{module}")
    old = getattr(kernels, name)
    setattr(kernels, name, value)
    try:
        yield
    finally:
        setattr(kernels, name, old)


# ---------------------------------------------------------------------------------------------
# layouts: the same values as a view of another memory layout
# ---------------------------------------------------------------------------------------------

LAYOUTS = ["contiguous", "transposed", "permuted", "sliced", "expanded"]


def _fill(dtype):
    return -12345 if not dtype.is_floating_point else math.nan


def as_layout(x, layout, seed=0):
    """A view with ``x``'s shape in ``layout``. Values equal x's, except ``expanded``: x's first
    entry along one dim (a dim of size > 1, the last one where none) repeated with stride 0."""
    if layout == "contiguous" or x.dim() == 0:
        return x.contiguous()
    if layout == "transposed":  # the last dim outermost in memory
        return x.movedim(-1, 0).contiguous().movedim(0, -1)
    if layout == "permuted":  # dims stored in a random order (reversed where that is the same)
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(x.dim(), generator=g).tolist()
        if order == list(range(x.dim())):
            order = order[::-1]
        inverse = [order.index(i) for i in range(x.dim())]
        return x.permute(order).contiguous().permute(inverse)
    if layout == "sliced":  # every other element of a buffer one larger, gaps poisoned
        big = torch.full([2 * n + 1 for n in x.shape], _fill(x.dtype), dtype=x.dtype, device=x.device)
        view = big[tuple(slice(1, 1 + 2 * n, 2) for n in x.shape)]
        view.copy_(x)
        return view
    assert layout == "expanded"
    dims = [d for d in range(x.dim()) if x.shape[d] > 1] or [x.dim() - 1]
    d = dims[seed % len(dims)]
    return x.narrow(d, 0, 1).contiguous().expand(x.shape)


def dense(x):
    return None if x is None else x.contiguous()


# ---------------------------------------------------------------------------------------------
# value and gradient checks (the family files' tolerances)
# ---------------------------------------------------------------------------------------------


def assert_loss(out, gt, refs32, atol=1e-7):
    """The loss: NaN where the float64 one is NaN, +-inf where it is beyond float32's range,
    else the suite's tolerance."""
    out, gt = out.double(), gt.double()
    in_range = gt.abs() <= FLOAT32_MAX
    want_inf = gt.isfinite() & ~in_range
    if want_inf.any():
        assert torch.equal(out[want_inf], gt[want_inf].sign() * math.inf), (
            f"loss: float64 {gt[want_inf].tolist()} is beyond float32, got {out[want_inf].tolist()}")
    nan = gt.isnan()
    assert torch.equal(out[nan].isnan(), nan[nan]), f"loss: want NaN, got {out[nan].tolist()}"
    keep = ~nan & ~want_inf
    TS.assert_close("loss", out[keep], gt[keep], [r.double()[keep] for r in refs32], torch.float32,
                    atol=atol)


def finite_rows(rows_gt, lead):
    """Rows whose float64 loss is finite (their gradient exists)."""
    return torch.isfinite(rows_gt).reshape(lead)


def grad_out_for(loss, kind):
    """grad_output: 1, a random positive scale, or negative (one per row for reduction none)."""
    if kind == "one":
        return torch.ones_like(loss)
    g = torch.rand(loss.shape, generator=TS._gen(99)).to(loss) * 2 + 0.25
    return g if kind == "random" else -g


# ---------------------------------------------------------------------------------------------
# kd_loss
# ---------------------------------------------------------------------------------------------

KD_BACKENDS = available_backends("kd_loss")
TEMPERATURES = st.one_of(st.sampled_from([0.05, 1.0, 2.0, 1e4]), st.floats(0.05, 1e4).map(
    lambda x: float(f"{x:.3g}")), st.floats(math.log(0.05), math.log(1e4)).map(
    lambda x: float(f"{math.exp(x):.3g}")))
BETAS = st.sampled_from([0.0, 1e-10, 1e-9, 0.1, 0.5, 0.9, 1 - 1e-9, 1 - 1e-10, 1.0])
EXTREMES = {  # special values by dtype (the largest finite of each)
    torch.float32: [-math.inf, 1e30, -1e30, 1e37, -1e37, 3e38, -3e38, FLOAT32_MAX, -FLOAT32_MAX,
                    1e-38, 1e-45, -1e-45, 0.0, 88.0, -104.0],
    torch.bfloat16: [-math.inf, 1e30, -1e30, 3e38, -3e38, 3.3895e38, -3.3895e38, 1e-38, 0.0,
                     88.0],
    torch.float16: [-math.inf, 65504.0, -65504.0, 6e-8, 6e-5, 0.0, 11.0, -17.0],
}


@st.composite
def kd_options(draw, reductions=("mean", "batchmean", "sum", "none")):
    divergence = draw(st.sampled_from(DIVERGENCES))
    opts = dict(divergence=divergence, temperature=draw(TEMPERATURES), beta=draw(BETAS),
                t2=draw(st.booleans()), reduction=draw(st.sampled_from(reductions)),
                hard_weight=draw(st.sampled_from([0.0, 0.0, 0.3])),
                soft_weight=draw(st.sampled_from([1.0, 1.0, 0.7, 0.0])))
    transform = draw(st.sampled_from(["none", "softcap", "scales", "caps"]))
    if transform == "softcap":
        opts["softcap"] = draw(st.sampled_from([2.0, 30.0]))
    elif transform == "scales":
        opts.update(student_logit_scale=draw(st.sampled_from([0.37, 1.8])),
                    teacher_logit_scale=draw(st.sampled_from([0.5, 2.1])))
    elif transform == "caps":
        opts.update(student_softcap=4.0, teacher_softcap=draw(st.sampled_from([1.5, 50.0])))
    if opts["soft_weight"] == 0.0:  # some term must depend on the student
        opts["hard_weight"] = 1.0
    return opts


@st.composite
def labels_for(draw, lead, vocab, required):
    """None, or labels with some rows ignored (as positions); None only where not required."""
    if not required and draw(st.booleans()):
        return None, []
    n = math.prod(lead)
    ignored = draw(st.lists(st.integers(0, n - 1), max_size=n, unique=True))
    return draw(st.integers(0, 1000)), ignored


def make_labels_at(lead, vocab, spec, layout, seed):
    label_seed, ignored = spec
    if label_seed is None:
        return None
    y = TS.make_labels(lead, vocab, ignore=ignored, seed=label_seed)
    return as_layout(y, layout, seed)


def poison_ignored(x, labels):
    """NaN in every row that labels ignore (where the ignored rows hold anything)."""
    if labels is None:
        return x
    return torch.where((labels == -100)[..., None], torch.full_like(x, math.nan), x)


def check_kd(backend, student, teacher, labels, *, teacher_grad, grad_kind, **kw):
    """kd_loss on ``backend`` with the given views against the float64 reference."""
    cfg = pdl.functional.kd_config(**kw)
    s = student.detach().requires_grad_()
    t = teacher.detach().requires_grad_(teacher_grad)
    loss = pdl.kd_loss(s, t, labels=labels, backend=backend, **kw)
    assert loss.dtype == torch.float32
    grad_out = grad_out_for(loss.detach(), grad_kind)
    inputs = [s, t] if teacher_grad else [s]
    grads = torch.autograd.grad(loss, inputs, grad_out)
    for g, x in zip(grads, inputs):
        assert g.dtype == x.dtype and g.shape == x.shape
    s0, t0, y0 = dense(student), dense(teacher), dense(labels)
    gt_loss, gt_s, gt_t = TS.reference(s0, t0, y0, cfg, grad_out, torch.float64)
    refs32 = TS.float32_references(backend, s0, t0, y0, cfg, grad_out, teacher_grad)
    assert_loss(loss.detach(), gt_loss, [r[0] for r in refs32])
    rows_cfg = RK.KDConfig(**{**RK.config_fields(cfg), "reduction": "none"})
    rows_gt = RK.kd_loss(s0.double(), t0.double(), y0, rows_cfg)
    rows = finite_rows(rows_gt, student.shape[:-1]) & TS.smooth_rows(s0, t0, cfg)
    TS.assert_close("grad student", grads[0][rows], gt_s[rows], [r[1][rows] for r in refs32],
                    student.dtype)
    if teacher_grad:
        TS.assert_close("grad teacher", grads[1][rows], gt_t[rows], [r[2][rows] for r in refs32],
                        teacher.dtype)
    return loss


@st.composite
def kd_layout_cases(draw):
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    vocab = draw(st.integers(1, 64))
    opts = draw(kd_options())
    labels = draw(labels_for(lead, vocab, required=opts["hard_weight"] != 0.0))
    layouts = [draw(st.sampled_from(LAYOUTS)) for _ in range(3)]
    return dict(lead=lead, vocab=vocab, opts=opts, labels=labels, layouts=layouts,
                dtype=draw(st.sampled_from(TS.DTYPES)), seed=draw(st.integers(0, 10_000)),
                teacher_grad=draw(st.booleans()),
                grad_kind=draw(st.sampled_from(["one", "random", "negative"])))


def kd_layout_property(backend, case):
    lead, vocab, seed, dtype = case["lead"], case["vocab"], case["seed"], case["dtype"]
    s = TS.logits(lead + (vocab,), dtype, seed=seed)
    t = TS.logits(lead + (vocab,), dtype, seed=seed + 3)
    ls, lt, ly = case["layouts"]
    y = make_labels_at(lead, vocab, case["labels"], ly, seed)
    s, t = as_layout(s, ls, seed), as_layout(t, lt, seed + 1)
    with tiles(backend, "softmax_divergence"):
        check_kd(backend, s, t, y, teacher_grad=case["teacher_grad"], grad_kind=case["grad_kind"],
                 **case["opts"])


@pytest.mark.parametrize("backend", KD_BACKENDS)
def test_kd_loss_layouts_and_options(backend):
    run_property(backend, kd_layout_cases(), kd_layout_property, 60)


@st.composite
def kd_extreme_cases(draw):
    n, vocab = draw(st.integers(1, 4)), draw(st.integers(2, 48))
    dtype = draw(st.sampled_from(TS.DTYPES))
    opts = draw(kd_options())
    if draw(st.booleans()):  # huge finite logits need T >= 1 and no scale up: z / T stays finite
        opts.update(temperature=draw(st.sampled_from([1.0, 2.0, 7.5])), student_logit_scale=1.0,
                    teacher_logit_scale=1.0)
    specials = st.sampled_from(EXTREMES[dtype])
    cells = st.tuples(st.integers(0, n - 1), st.integers(0, vocab - 1), specials)
    labels = draw(labels_for((n,), vocab, required=opts["hard_weight"] != 0.0))
    return dict(n=n, vocab=vocab, dtype=dtype, opts=opts, labels=labels,
                student=draw(st.lists(cells, max_size=2 * vocab)),
                teacher=draw(st.lists(cells, max_size=2 * vocab)),
                scale=draw(st.sampled_from([0.01, 3.0, 40.0])), seed=draw(st.integers(0, 10_000)),
                nan_ignored=draw(st.booleans()), teacher_grad=draw(st.booleans()),
                grad_kind=draw(st.sampled_from(["one", "random"])))


def with_specials(x, cells):
    x = x.clone()
    for row, col, value in cells:
        x[row, col] = value
    return x


def kd_extreme_property(backend, case):
    n, vocab, dtype, seed = case["n"], case["vocab"], case["dtype"], case["seed"]
    s = with_specials(TS.logits((n, vocab), torch.float32, scale=case["scale"], seed=seed),
                      case["student"]).to(dtype)
    t = with_specials(TS.logits((n, vocab), torch.float32, scale=case["scale"], seed=seed + 3),
                      case["teacher"]).to(dtype)
    y = make_labels_at((n,), vocab, case["labels"], "contiguous", seed)
    if case["nan_ignored"]:
        s, t = poison_ignored(s, y), poison_ignored(t, y)
    # an all -inf teacher row has no distribution (NaN by definition): keep one finite entry
    t[:, 0] = torch.where(torch.isinf(t).all(-1), 0.0, t[:, 0].float()).to(dtype)
    with tiles(backend, "softmax_divergence"):
        check_kd(backend, s, t, y, teacher_grad=case["teacher_grad"], grad_kind=case["grad_kind"],
                 **case["opts"])


@pytest.mark.parametrize("backend", KD_BACKENDS)
def test_kd_loss_extreme_values(backend):
    run_property(backend, kd_extreme_cases(), kd_extreme_property, 80)


@st.composite
def kd_temperature_cases(draw):
    return dict(divergence=draw(st.sampled_from(DIVERGENCES)),
                temperature=draw(st.sampled_from([30.0, 100.0, 1000.0, 1e4])),
                beta=draw(st.sampled_from([0.1, 0.5, 0.9])), vocab=draw(st.sampled_from([64, 300])),
                scale=draw(st.sampled_from([1.0, 3.0, 10.0])), seed=draw(st.integers(0, 10_000)),
                dtype=draw(st.sampled_from(TS.DTYPES)))


def kd_temperature_property(backend, case):
    vocab, seed, dtype = case["vocab"], case["seed"], case["dtype"]
    # student and teacher independent: the loss is well conditioned (relative error ~ eps T)
    s = TS.logits((2, vocab), dtype, scale=case["scale"], seed=seed)
    t = TS.logits((2, vocab), dtype, scale=case["scale"], seed=seed + 3)
    kw = dict(divergence=case["divergence"], temperature=case["temperature"], beta=case["beta"])
    with tiles(backend, "softmax_divergence", value=64):
        loss = pdl.kd_loss(s, t, backend=backend, reduction="none", **kw)
    gt = RK.kd_loss(s.double(), t.double(), None, RK.KDConfig(reduction="none", **kw))
    rel = ((loss.double() - gt).abs() / gt.abs()).max().item()
    bound = 1e-6 * case["temperature"]
    assert rel <= bound, (f"loss at T = {case['temperature']}: relative error {rel:.3g} > {bound:.3g}"
                          f" (got {loss.tolist()}, want {gt.tolist()})")
    with tiles(backend, "softmax_divergence", value=64):
        check_kd(backend, s, t, None, teacher_grad=True, grad_kind="random", reduction="sum",
                 **kw)


@pytest.mark.parametrize("backend", KD_BACKENDS)
def test_kd_loss_large_temperature(backend):
    run_property(backend, kd_temperature_cases(), kd_temperature_property, 24)

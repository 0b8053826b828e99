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
multiplies every example budget (the Triton interpreter's budgets are a fifth of the
others': 0.5 to 3 s a call); the slowest are marked ``slow``. Shapes stay tiny: V <= 64, one
property at V ~ 300.
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
from conftest import available_backends

DIVERGENCES = list(RK.DIVERGENCES)
TAILS = list(RT.TAILS)
SCALE = int(os.environ.get("PYDISTILL_PROPERTY_SCALE", "1"))
PROFILE = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.filter_too_much])
FLOAT32_MAX = torch.finfo(torch.float32).max


def backends(op, slow_triton=False):
    """The backends that run ``op`` here, as parameters; under the interpreter the Triton one
    marked ``slow`` where ``slow_triton``."""
    slow = slow_triton and TS.INTERPRETED
    return [pytest.param(b, marks=pytest.mark.slow) if b == "triton" and slow else b
            for b in available_backends(op)]


def run_property(backend, strategy, check, examples):
    """Run ``check(backend, case)`` over ``examples`` cases drawn from ``strategy`` (a fifth of
    them under the Triton interpreter)."""
    budget = examples * SCALE
    if backend == "triton" and TS.INTERPRETED:
        budget = max(3, budget // 5)

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


def as_layout(x, layout, seed=0, expand_last=True):
    """A view with ``x``'s shape in ``layout``. Values equal x's, except ``expanded``: x's first
    entry along one dim of size > 1 (the last dim too unless ``expand_last`` is False) repeated
    with stride 0."""
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
        big = torch.full([2 * n + 1 for n in x.shape], _fill(x.dtype), dtype=x.dtype,
                         device=x.device)
        view = big[tuple(slice(1, 1 + 2 * n, 2) for n in x.shape)]
        view.copy_(x)
        return view
    assert layout == "expanded"
    last = x.dim() if expand_last else x.dim() - 1
    dims = [d for d in range(last) if x.shape[d] > 1] or [0]
    d = dims[seed % len(dims)]
    return x.narrow(d, 0, 1).contiguous().expand(x.shape)


def dense(x):
    return None if x is None else x.contiguous()


# ---------------------------------------------------------------------------------------------
# value and gradient checks (the family files' tolerances)
# ---------------------------------------------------------------------------------------------


def assert_loss(out, gt, refs32, atol=1e-7):
    """The loss against the float64 one ``gt``: NaN where it is NaN (and nowhere else), +-inf
    where it is beyond float32's range, else the suite's tolerance. Where float32 itself
    underflows a probability (every float32 reference finite where gt is infinite, or infinite
    where gt is finite), the backend may do the same: finite, or that infinity."""
    out, gt = out.double(), gt.double()
    refs = [r.double() for r in refs32]
    nan = gt.isnan()
    assert torch.equal(out.isnan(), nan), f"loss: NaN where float64 has {gt[out.isnan()].tolist()}"
    beyond = gt.isfinite() & (gt.abs() > FLOAT32_MAX)
    if beyond.any():
        assert torch.equal(out[beyond], gt[beyond].sign() * math.inf), (
            f"loss: float64 {gt[beyond].tolist()} is beyond float32, got {out[beyond].tolist()}")
    f32_finite = gt.isinf() & torch.stack([r.isfinite() for r in refs]).all(0)
    assert out[f32_finite].isfinite().all(), (
        f"loss: float32 is finite, got {out[f32_finite].tolist()}")
    f32_inf = gt.isfinite() & torch.stack([r == refs[0] for r in refs]).all(0) & refs[0].isinf()
    keep = ~nan & ~beyond & ~f32_finite & ~(f32_inf & (out == refs[0]))
    inf = keep & gt.isinf()
    assert torch.equal(out[inf], gt[inf]), f"loss: got {out[inf].tolist()}, want {gt[inf].tolist()}"
    keep = keep & gt.isfinite()
    atol = torch.as_tensor(atol, dtype=torch.float64).expand(gt.shape)[keep]
    TS.assert_close("loss", out[keep], gt[keep], [r[keep] for r in refs], torch.float32,
                    atol=1e-7 + atol)


EPS32 = torch.finfo(torch.float32).eps


def loss_floor(loss_fn, tensors, per_row):
    """What one float32 rounding of every input (relative eps) moves the loss by, to first order:
    eps sum |dloss/dx| |x| (per row for reduction none), from the float64 reference. Through
    x / T and the logit transforms it is also one rounding of the tempered logits, which no
    float32 ordering avoids; where the float32 references happen to land closer, this is the
    floor of the tolerance."""
    xs = [x.detach().double().requires_grad_() for x in tensors]
    out = loss_fn(*xs)
    grads = torch.autograd.grad(out.sum(), xs, allow_unused=True)
    per = sum(torch.nan_to_num((g * x).abs(), nan=0.0, posinf=0.0).sum(-1)
              for g, x in zip(grads, xs) if g is not None)
    per = EPS32 * torch.as_tensor(per, dtype=torch.float64)
    return per if per_row else per.sum()


def gradient_floor(log_q, log_p, cfg, labels, grad_out, z_s, x_abs=0.0):
    """Per logit, one float32 rounding of each probability, log-probability and tempered logit
    x = z / T (``x_abs``: |x_s| + |x_t|) the gradient is made of:
    4 eps (p + q)(1 + |log p| + |log q| + |x_s| + |x_t|) soft_scale a / T for the divergence, and
    4 eps (softmax(z) + onehot(y)) hard_weight a for the hard term, times each row's weight
    (grad_output, over the count under mean); a the logit scale. Where the student nears the
    teacher the gradient cancels (q - p) and no float32 ordering does better."""
    q, p = log_q.exp(), log_p.exp()
    mag = lambda lg: torch.nan_to_num(lg.abs(), posinf=0.0)
    soft = (p + q) * (1 + mag(log_p) + mag(log_q) + x_abs) * abs(cfg.soft_scale) / cfg.temperature
    if cfg.hard_weight != 0.0:
        q1 = torch.softmax(z_s, -1)
        onehot = torch.zeros_like(q1).scatter_(-1, labels.clamp(min=0).long()[..., None], 1.0)
        soft = soft + (q1 + onehot) * abs(cfg.hard_weight)
    lead = log_q.shape[:-1]
    weight = grad_out.abs().double()
    if cfg.reduction != "none":
        count = lead.numel() if labels is None else int((labels != cfg.ignore_index).sum())
        weight = weight / (max(count, 1) if cfg.reduction in ("mean", "batchmean") else 1)
        weight = weight.expand(lead)
    scale = max(cfg.student_logit_scale, cfg.teacher_logit_scale)
    return torch.nan_to_num(4 * EPS32 * scale * soft * weight[..., None], nan=0.0, posinf=0.0)


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


# spread of the random logits: near-uniform (student close to teacher), trained-like, peaked
LOGIT_SCALES = [0.01, 3.0, 40.0]


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
    if cfg.soft_weight >= 0 and cfg.hard_weight >= 0:  # a divergence and a cross-entropy are >= 0
        assert not (loss < 0).any(), f"loss: negative, {loss.tolist()}"
    grad_out = grad_out_for(loss.detach(), grad_kind)
    inputs = [s, t] if teacher_grad else [s]
    grads = torch.autograd.grad(loss, inputs, grad_out)
    for g, x in zip(grads, inputs):
        assert g.dtype == x.dtype and g.shape == x.shape
    s0, t0, y0 = dense(student), dense(teacher), dense(labels)
    gt_loss, gt_s, gt_t = TS.reference(s0, t0, y0, cfg, grad_out, torch.float64)
    refs32 = TS.float32_references(backend, s0, t0, y0, cfg, grad_out, teacher_grad)
    floor = loss_floor(lambda a, b: RK.kd_loss(a, b, y0, cfg), [s0, t0], cfg.reduction == "none")
    assert_loss(loss.detach(), gt_loss, [r[0] for r in refs32], floor)
    rows_cfg = RK.KDConfig(**{**RK.config_fields(cfg), "reduction": "none"})
    rows_gt = RK.kd_loss(s0.double(), t0.double(), y0, rows_cfg)
    rows = finite_rows(rows_gt, student.shape[:-1]) & TS.smooth_rows(s0, t0, cfg)
    if y0 is not None:
        rows = rows & (y0 != cfg.ignore_index)  # ignored rows: exactly 0 (below)
        assert (grads[0][y0 == cfg.ignore_index] == 0).all(), "grad student: ignored rows not 0"
    z_s, z_t = cfg.student_transform(s0.double()), cfg.teacher_transform(t0.double())
    x_abs = torch.nan_to_num((z_s.abs() + z_t.abs()) / cfg.temperature, posinf=0.0)
    floor = gradient_floor(torch.log_softmax(z_s / cfg.temperature, -1),
                           torch.log_softmax(z_t / cfg.temperature, -1), cfg, y0, grad_out, z_s,
                           x_abs)
    TS.assert_close("grad student", grads[0][rows], gt_s[rows], [r[1][rows] for r in refs32],
                    student.dtype, atol=floor[rows])
    if teacher_grad:
        TS.assert_close("grad teacher", grads[1][rows], gt_t[rows], [r[2][rows] for r in refs32],
                        teacher.dtype, atol=floor[rows])
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


@pytest.mark.parametrize("backend", backends("kd_loss"))
def test_kd_loss_layouts_and_options(backend):
    run_property(backend, kd_layout_cases(), kd_layout_property, 40)


@st.composite
def kd_extreme_cases(draw):
    n, vocab = draw(st.integers(1, 4)), draw(st.integers(2, 48))
    dtype = draw(st.sampled_from(TS.DTYPES))
    opts = draw(kd_options())
    pool = EXTREMES[dtype]
    if draw(st.booleans()):  # huge finite logits need T >= 1 and no scale up: z / T stays finite
        opts.update(temperature=draw(st.sampled_from([1.0, 2.0, 7.5])), student_logit_scale=1.0,
                    teacher_logit_scale=1.0)
    else:  # float32's range is the documented limit of the tempered logits
        pool = [v for v in pool if not 1e29 < abs(v) < math.inf]
    specials = st.sampled_from(pool)
    cells = st.tuples(st.integers(0, n - 1), st.integers(0, vocab - 1), specials)
    labels = draw(labels_for((n,), vocab, required=opts["hard_weight"] != 0.0))
    return dict(n=n, vocab=vocab, dtype=dtype, opts=opts, labels=labels,
                student=draw(st.lists(cells, max_size=2 * vocab)),
                teacher=draw(st.lists(cells, max_size=2 * vocab)),
                scale=draw(st.sampled_from(LOGIT_SCALES)),
                teacher_scale=draw(st.sampled_from(LOGIT_SCALES)),
                seed=draw(st.integers(0, 10_000)),
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
    t = with_specials(TS.logits((n, vocab), torch.float32, scale=case["teacher_scale"],
                                seed=seed + 3),
                      case["teacher"]).to(dtype)
    y = make_labels_at((n,), vocab, case["labels"], "contiguous", seed)
    if case["nan_ignored"]:
        s, t = poison_ignored(s, y), poison_ignored(t, y)
    # an all -inf teacher row has no distribution (NaN by definition): keep one finite entry
    t[:, 0] = torch.where(torch.isinf(t).all(-1), 0.0, t[:, 0].float()).to(dtype)
    with tiles(backend, "softmax_divergence"):
        check_kd(backend, s, t, y, teacher_grad=case["teacher_grad"], grad_kind=case["grad_kind"],
                 **case["opts"])


@pytest.mark.parametrize("backend", backends("kd_loss", slow_triton=True))
def test_kd_loss_extreme_values(backend):
    run_property(backend, kd_extreme_cases(), kd_extreme_property, 60)


@st.composite
def kd_endpoint_cases(draw):
    """The mixed divergences with beta at or within 1e-9 of 0 and 1 (beta is not to be rounded
    to float32 on its way in: 1 - 1e-9 would become 1)."""
    return dict(lead=(draw(st.integers(1, 4)),), vocab=draw(st.integers(2, 64)),
                opts=dict(divergence=draw(st.sampled_from(["jsd", "skew_kl", "skew_reverse_kl"])),
                          beta=draw(st.sampled_from([1e-12, 1e-10, 1e-9, 1e-7, 1 - 1e-7, 1 - 1e-9,
                                                     1 - 1e-10, 1 - 1e-12])),
                          temperature=draw(st.sampled_from([0.5, 1.0, 2.0])),
                          reduction=draw(st.sampled_from(["mean", "none"]))),
                labels=(None, []), layouts=["contiguous"] * 3, dtype=torch.float32,
                seed=draw(st.integers(0, 10_000)), teacher_grad=draw(st.booleans()),
                grad_kind="random")


@pytest.mark.parametrize("backend", backends("kd_loss"))
def test_kd_loss_mixture_weight_near_endpoints(backend):
    run_property(backend, kd_endpoint_cases(), kd_layout_property, 16)


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
    assert rel <= bound, (f"loss at T = {case['temperature']}: relative error {rel:.3g} > "
                          f"{bound:.3g}"
                          f" (got {loss.tolist()}, want {gt.tolist()})")
    with tiles(backend, "softmax_divergence", value=64):
        check_kd(backend, s, t, None, teacher_grad=True, grad_kind="random", reduction="sum",
                 **kw)


@pytest.mark.parametrize("backend", backends("kd_loss"))
def test_kd_loss_large_temperature(backend):
    run_property(backend, kd_temperature_cases(), kd_temperature_property, 16)


# ---------------------------------------------------------------------------------------------
# topk_kd_loss (teacher_temperature always given)
# ---------------------------------------------------------------------------------------------

TOPK_EXTREMES = [-math.inf, 1e30, -1e30, 3e38, -3e38, 1e-45, 0.0]


@st.composite
def topk_cases(draw):
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    vocab = draw(st.integers(2, 64))
    k = draw(st.integers(1, min(vocab, 12)))
    opts = draw(kd_options())
    for name in ("teacher_logit_scale", "teacher_softcap"):  # the teacher is log-probs
        opts.pop(name, None)
    if "softcap" in opts:
        opts["student_softcap"] = opts.pop("softcap")
    opts["tail"] = draw(st.sampled_from(TAILS))
    opts["teacher_temperature"] = draw(st.sampled_from([None, 0.7, 1.0, 2.5]))  # None: = T
    extreme = draw(st.booleans())
    pool = TOPK_EXTREMES
    if extreme and draw(st.booleans()):  # huge finite logits: T >= 1, no scale up (as kd_loss's)
        opts.update(temperature=draw(st.sampled_from([1.0, 2.0])), student_logit_scale=1.0)
    else:
        pool = [v for v in pool if not 1e29 < abs(v) < math.inf]
    n = math.prod(lead)
    cells = st.tuples(st.integers(0, n - 1), st.integers(0, vocab - 1), st.sampled_from(pool))
    return dict(lead=lead, vocab=vocab, k=k, opts=opts,
                labels=draw(labels_for(lead, vocab, required=opts["hard_weight"] != 0.0)),
                layouts=[draw(st.sampled_from(LAYOUTS)) for _ in range(4)],
                dtype=draw(st.sampled_from(TS.DTYPES)), seed=draw(st.integers(0, 10_000)),
                student=draw(st.lists(cells, max_size=vocab)) if extreme else [],
                padded=draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, k - 1)),
                                     max_size=k)) if extreme else [],
                nan_ignored=draw(st.booleans()),
                grad_kind=draw(st.sampled_from(["one", "random", "negative"])))


def check_topk(backend, student, lp, idx, labels, *, grad_kind, **kw):
    if kw["teacher_temperature"] is None:  # explicit: the generation temperature is T
        kw["teacher_temperature"] = kw["temperature"]
    cfg = pdl.functional.topk_config(**kw)
    s = student.detach().requires_grad_()
    loss = pdl.topk_kd_loss(s, lp, idx, labels=labels, backend=backend, **kw)
    grad_out = grad_out_for(loss.detach(), grad_kind)
    g, = torch.autograd.grad(loss, s, grad_out)
    assert g.dtype == s.dtype and g.shape == s.shape
    s0, lp0, idx0, y0 = dense(student), dense(lp), dense(idx), dense(labels)
    gt_loss, gt_g = TT.reference(s0, lp0, idx0, y0, cfg, grad_out, torch.float64)
    refs32 = TT.float32_references(backend, s0, lp0, idx0, y0, cfg, grad_out)
    floor = loss_floor(lambda a, b: RT.topk_kd_loss(a, b, idx0, y0, cfg), [s0, lp0],
                       cfg.reduction == "none")
    assert_loss(loss.detach(), gt_loss, [r[0] for r in refs32], floor)
    rows_cfg = RT.TopKConfig(**{**RK.config_fields(cfg), "reduction": "none"})
    rows_gt = RT.topk_kd_loss(s0.double(), lp0.double(), idx0, y0, rows_cfg)
    rows = finite_rows(rows_gt, student.shape[:-1]) & TT.smooth_rows(s0, lp0, idx0, cfg)
    if y0 is not None:
        rows = rows & (y0 != cfg.ignore_index)
        assert (g[y0 == cfg.ignore_index] == 0).all(), "grad student: ignored rows not 0"
    z_s = cfg.student_transform(s0.double())
    lp_dense = torch.full_like(z_s, -math.inf).scatter(
        -1, RT.safe_indices(idx0, z_s.shape[-1])[0], torch.nan_to_num(lp0.double(), nan=0.0))
    floor = gradient_floor(torch.log_softmax(z_s / cfg.temperature, -1), lp_dense, cfg, y0,
                           grad_out, z_s, torch.nan_to_num(z_s.abs() / cfg.temperature, posinf=0.0))
    TS.assert_close("grad student", g[rows], gt_g[rows], [r[1][rows] for r in refs32], s.dtype,
                    atol=floor[rows])


def topk_property(backend, case):
    lead, vocab, k = case["lead"], case["vocab"], case["k"]
    seed, dtype = case["seed"], case["dtype"]
    opts = dict(case["opts"])
    t_gen = opts["teacher_temperature"] or opts["temperature"]
    lp, idx, _ = TT.topk_teacher(lead, vocab, k, torch.float32, seed=seed + 3, t_gen=t_gen)
    s = TS.logits(lead + (vocab,), torch.float32, seed=seed).reshape(-1, vocab)
    lp = lp.reshape(-1, k)
    s = with_specials(s, case["student"])
    for row, col in case["padded"]:  # fewer than K candidates: padded with -inf
        lp[row, col] = -math.inf
    s, lp = s.reshape(lead + (vocab,)).to(dtype), lp.reshape(lead + (k,))
    ls, llp, lidx, ly = case["layouts"]
    y = make_labels_at(lead, vocab, case["labels"], ly, seed)
    if case["nan_ignored"]:  # not in an expanded view, whose rows share storage
        s = s if ls == "expanded" else poison_ignored(s, y)
        lp = lp if llp == "expanded" else poison_ignored(lp, y)
    s, lp = as_layout(s, ls, seed), as_layout(lp, llp, seed + 1)
    idx = as_layout(idx, lidx, seed + 2, expand_last=False)  # ids stay distinct within a row
    with tiles(backend, "topk_divergence"):
        check_topk(backend, s, lp, idx, y, grad_kind=case["grad_kind"], **opts)


@pytest.mark.parametrize("backend", backends("topk_kd_loss"))
def test_topk_kd_loss_layouts_and_values(backend):
    run_property(backend, topk_cases(), topk_property, 40)


# ---------------------------------------------------------------------------------------------
# linear_kd_loss: chunk sizes, teacher kinds, NaN hidden states in ignored rows
# ---------------------------------------------------------------------------------------------

@st.composite
def linear_cases(draw, backend):
    lead = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    n = math.prod(lead)
    kind = draw(st.sampled_from(["head", "head+bias", "logits", "topk"]))
    chunks = [1, 2, 4, n, n + 3, "auto"]
    if backend == "triton" and kind != "topk":
        chunks += ["tiled", "tiled"]
    opts = draw(kd_options())
    if kind == "topk":
        for name in ("teacher_logit_scale", "teacher_softcap"):
            opts.pop(name, None)
        if "softcap" in opts:
            opts["student_softcap"] = opts.pop("softcap")
        opts.update(tail=draw(st.sampled_from(TAILS)),
                    teacher_temperature=draw(st.sampled_from([0.7, 1.0, 2.5])))
    chunk = draw(st.sampled_from(chunks))
    teacher_grad = kind in ("head", "logits") and chunk != "tiled" and draw(st.booleans())
    return dict(lead=lead, kind=kind, chunk=chunk, opts=opts, teacher_grad=teacher_grad,
                vocab=draw(st.integers(2, 48)), hidden=draw(st.integers(1, 12)),
                teacher_vocab_delta=draw(st.sampled_from([0, 0, -3, 5])) if kind != "topk" else 0,
                vocab_mismatch=draw(st.sampled_from(["restrict", "pad"])),
                bias=draw(st.booleans()), frozen_weight=draw(st.booleans()),
                labels=draw(labels_for(lead, 1, required=opts["hard_weight"] != 0.0)),
                layouts=[draw(st.sampled_from(LAYOUTS)) for _ in range(8)],
                nan_ignored=draw(st.booleans()), seed=draw(st.integers(0, 10_000)),
                grad_kind=draw(st.sampled_from(["one", "random", "negative"])))


def linear_inputs(case):
    lead, vocab, seed = case["lead"], case["vocab"], case["seed"]
    v_t = max(1, vocab + case["teacher_vocab_delta"])
    inputs = TL.head(lead, case["hidden"], vocab, seed=seed, bias=case["bias"])
    inputs["student_weight"].requires_grad_(not case["frozen_weight"])
    kind = case["kind"]
    if kind in ("head", "head+bias", "logits"):
        inputs.update(TL.teacher(kind, lead, v_t, seed=seed + 11, grad=case["teacher_grad"]))
    return inputs


def linear_property(backend, case):
    lead, vocab, seed, kind = case["lead"], case["vocab"], case["seed"], case["kind"]
    opts = dict(case["opts"])
    inputs = linear_inputs(case)
    v_min = max(1, min(vocab, vocab + case["teacher_vocab_delta"]))
    y_view = make_labels_at(lead, v_min, case["labels"], case["layouts"][-1], seed)
    y = dense(y_view)
    topk = None
    if kind == "topk":
        k = min(vocab, 5)
        lp, idx, _ = TT.topk_teacher(lead, vocab, k, torch.float32, seed=seed + 11,
                                     t_gen=opts["teacher_temperature"])
        topk = (lp, idx)
    # the views the backend gets, NaN hidden states (and teacher rows) where labels ignore (but
    # in an expanded view, whose rows share storage); the reference gets the same values with
    # those rows zeroed (ignored rows hold anything: the result must not change)
    poison = case["nan_ignored"] and y is not None
    layouts = iter(case["layouts"])

    def view(x, seed_, rows, **kw):
        layout = next(layouts)
        x = x.detach()
        if poison and rows and layout != "expanded":
            x = poison_ignored(x, y)
        v = as_layout(x, layout, seed_, **kw)
        clean = dense(v) if not (rows and y is not None) else torch.where(
            (y == -100)[..., None], 0.0, dense(v))
        return v, clean

    row_tensors = ("student_hidden", "teacher_hidden", "teacher_logits")
    given, clean = {}, {}
    for name in sorted(inputs):
        given[name], clean[name] = view(inputs[name], seed, name in row_tensors)
        clean[name].requires_grad_(inputs[name].requires_grad)
    if topk is not None:
        (lp_view, lp), (idx_view, idx) = view(lp, seed + 1, True), view(idx, seed + 2, False,
                                                                      expand_last=False)
        topk = (lp_view, idx_view)
    inputs = clean
    leaves = {name: x.requires_grad_(clean[name].requires_grad) for name, x in given.items()}
    extra = {} if topk is None else {"teacher_topk": topk}
    with tiles(backend, "softmax_divergence"), tiles(backend, "topk_divergence"):
        loss = pdl.linear_kd_loss(**leaves, labels=y_view, chunk_size=case["chunk"],
                                  vocab_mismatch=case["vocab_mismatch"], backend=backend,
                                  **extra, **opts)
    grad_out = grad_out_for(loss.detach(), case["grad_kind"])
    wanted = [name for name, x in leaves.items() if x.requires_grad]
    grads = dict(zip(wanted, torch.autograd.grad(loss, [leaves[n] for n in wanted], grad_out)))
    # the reference on the clean inputs (ignored rows hold anything: the result must not change)
    cfg_kw = {k: v for k, v in opts.items() if k not in ("tail", "teacher_temperature")}
    if kind == "topk":
        cfg = pdl.functional.topk_config(tail=opts["tail"],
                                         teacher_temperature=opts["teacher_temperature"], **cfg_kw)
    else:
        cfg = pdl.functional.kd_config(**cfg_kw)

    def reference(dtype, backend_math=False):
        """Loss and gradients through the materialised heads in ``dtype``: the reference, or (a
        second float32 ordering, as test_softmax_divergence's) the torch backend's closed form."""
        xs = {n: x.detach().to(dtype).requires_grad_(x.requires_grad) for n, x in inputs.items()}
        s = logits_s = RL.head_logits(xs["student_hidden"], xs["student_weight"],
                                      xs.get("student_bias"))
        kw = dict(labels=y, backend="torch", **RK.config_fields(cfg))
        if kind == "topk":
            kw = {k: v for k, v in kw.items()
                  if k not in ("teacher_logit_scale", "teacher_softcap")}
            ref = (pdl.topk_kd_loss(s, lp.to(dtype), idx, **kw) if backend_math
                   else RT.topk_kd_loss(s, lp.to(dtype), idx, y, cfg))
        else:
            t = xs.get("teacher_logits")
            if t is None:
                t = RL.head_logits(xs["teacher_hidden"], xs["teacher_weight"],
                                   xs.get("teacher_bias"))
            if case["vocab_mismatch"] == "restrict":  # a longer teacher cut to V_s
                t = t[..., :s.shape[-1]]
            v = max(s.shape[-1], t.shape[-1])
            s, t = RL.pad_vocab(s, v), RL.pad_vocab(t, v)
            ref = pdl.kd_loss(s, t, **kw) if backend_math else RK.kd_loss(s, t, y, cfg)
        names = [n for n, x in xs.items() if x.requires_grad]
        if not ref.requires_grad:  # no term depends on any input (skew_kl at beta = 1, ...)
            return ref, {n: torch.zeros_like(xs[n]) for n in names}, torch.zeros_like(logits_s)
        grads_ = torch.autograd.grad(ref, [xs[n] for n in names] + [logits_s], grad_out.to(dtype),
                                     allow_unused=True)
        out = {n: torch.zeros_like(xs[n]) if g is None else g for n, g in zip(names, grads_)}
        return ref.detach(), out, grads_[-1]

    gt_loss, gt, gt_logits = reference(torch.float64)
    refs32 = [reference(torch.float32), reference(torch.float32, backend_math=True)]
    # dh = g W and dW = g^T h sum products that may cancel exactly (e.g. an expanded weight): one
    # float32 rounding of the logits' gradient g is allowed for, eps |g| |W| and eps |g|^T |h|
    eps = torch.finfo(torch.float32).eps
    g_abs = torch.nan_to_num(gt_logits.abs(), posinf=0.0).reshape(-1, gt_logits.shape[-1])
    h_abs = inputs["student_hidden"].detach().double().abs().reshape(g_abs.shape[0], -1)
    floors = {"student_hidden": g_abs @ inputs["student_weight"].detach().double().abs(),
              "student_weight": g_abs.T @ h_abs, "student_bias": g_abs.sum(0)}
    if kind != "topk" and cfg.divergence == "tvd":  # rows where tvd's gradient jumps make dW
        s64, t64 = TL.materialised(inputs)           # incomparable
        if not TS.smooth_rows(s64, t64, cfg).all():
            return
    assert_loss(loss.detach(), gt_loss, [r[0] for r in refs32])
    if not torch.isfinite(gt_loss).all():  # a row of infinite loss: no gradient to compare
        return
    assert set(grads) == set(gt)
    for name, g in grads.items():
        assert g.dtype == inputs[name].dtype and g.shape == inputs[name].shape, name
        floor = floors.get(name)
        atol = 0.0 if floor is None or floor.numel() == 0 else 4 * eps * float(floor.max())
        TS.assert_close(f"grad {name}", g, gt[name], [r[1][name] for r in refs32], g.dtype,
                        atol=atol)


@pytest.mark.parametrize("backend", backends("linear_kd_loss", slow_triton=True))
def test_linear_kd_loss_chunks_teachers_layouts(backend):
    run_property(backend, linear_cases(backend), linear_property, 24)


# ---------------------------------------------------------------------------------------------
# uld_loss
# ---------------------------------------------------------------------------------------------

@st.composite
def uld_cases(draw):
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    v_s, v_t = draw(st.integers(2, 64)), draw(st.integers(2, 64))
    opts = dict(temperature=draw(TEMPERATURES), reduction=draw(st.sampled_from(RU.ULD_REDUCTIONS)),
                top_k=draw(st.one_of(st.none(), st.integers(1, min(v_s, v_t)))))
    transform = draw(st.sampled_from(["none", "scales", "caps"]))
    if transform == "scales":
        opts.update(student_logit_scale=0.37, teacher_logit_scale=2.1)
    elif transform == "caps":
        opts.update(student_softcap=4.0, teacher_softcap=draw(st.sampled_from([1.5, 50.0])))
    n = math.prod(lead)
    masked = st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 63)), max_size=8)
    return dict(lead=lead, v_s=v_s, v_t=v_t, opts=opts,
                labels=draw(labels_for(lead, 1, required=False)),
                layouts=[draw(st.sampled_from(LAYOUTS)) for _ in range(3)],
                dtype=draw(st.sampled_from([torch.float32, torch.float16])),
                masked_s=draw(masked), masked_t=draw(masked), nan_ignored=draw(st.booleans()),
                seed=draw(st.integers(0, 10_000)), teacher_grad=draw(st.booleans()),
                grad_kind=draw(st.sampled_from(["one", "random", "negative"])))


def masked(x, cells):
    """-inf at the given (row, col) cells (col modulo V), one finite entry kept per row."""
    x = x.clone().reshape(-1, x.shape[-1])
    for row, col in cells:
        x[row, col % x.shape[-1]] = -math.inf
    x[:, 0] = torch.where(torch.isinf(x).all(-1), 1.0, x[:, 0])
    return x


def has_ties(x):
    """Two equal finite entries in a row (the sort's non-differentiable points, where backends
    may order ties differently)."""
    srt = x.double().sort(-1).values
    same = (srt[..., 1:] == srt[..., :-1]) & torch.isfinite(srt[..., 1:])
    return bool(same.any())


def uld_property(backend, case):
    from hypothesis import assume

    lead, seed, dtype = case["lead"], case["seed"], case["dtype"]
    s = masked(TS.logits(lead + (case["v_s"],), torch.float32, seed=seed), case["masked_s"])
    t = masked(TS.logits(lead + (case["v_t"],), torch.float32, seed=seed + 3), case["masked_t"])
    s, t = s.reshape(lead + (-1,)).to(dtype), t.reshape(lead + (-1,)).to(dtype)
    ls, lt, ly = case["layouts"]
    y = make_labels_at(lead, 1, case["labels"], ly, seed)
    if case["nan_ignored"]:  # not in an expanded view, whose rows share storage
        s = s if ls == "expanded" else poison_ignored(s, y)
        t = t if lt == "expanded" else poison_ignored(t, y)
    s, t = as_layout(s, ls, seed), as_layout(t, lt, seed + 1)
    counted = slice(None) if y is None else (dense(y) != -100)
    assume(not has_ties(s[counted]) and not has_ties(t[counted]))
    kw, teacher_grad = case["opts"], case["teacher_grad"]
    cfg = pdl.functional.uld_config(**kw)
    a = s.detach().requires_grad_()
    b = t.detach().requires_grad_(teacher_grad)
    with tiles(backend, "uld"):
        loss = pdl.uld_loss(a, b, labels=y, backend=backend, **kw)
    grad_out = grad_out_for(loss.detach(), case["grad_kind"])
    inputs = [a, b] if teacher_grad else [a]
    grads = torch.autograd.grad(loss, inputs, grad_out)
    s0, t0, y0 = dense(s), dense(t), dense(y)
    gt = TU.reference(s0, t0, y0, cfg, grad_out, torch.float64)
    ref32 = TU.reference(s0, t0, y0, cfg, grad_out, torch.float32)
    assert_loss(loss.detach(), gt[0], [ref32[0]])
    TU.assert_close("grad student", grads[0], gt[1], [ref32[1]], s.dtype)
    if teacher_grad:
        TU.assert_close("grad teacher", grads[1], gt[2], [ref32[2]], t.dtype)


@pytest.mark.parametrize("backend", backends("uld_loss"))
def test_uld_loss_layouts_and_values(backend):
    run_property(backend, uld_cases(), uld_property, 30)


# ---------------------------------------------------------------------------------------------
# attention_kd_loss: (B, L, H, d) storage (Hugging Face's), expanded GQA keys, masks
# ---------------------------------------------------------------------------------------------

QK_LAYOUTS = LAYOUTS + ["heads-last"]


def qk_layout(x, layout, seed):
    if layout == "heads-last":  # stored (B, L, H, d), viewed as (B, H, L, d)
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return as_layout(x, layout, seed)


@st.composite
def attention_cases(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    kv = [h for h in (1, 2, 4) if heads % h == 0]
    return dict(batch=draw(st.integers(1, 2)), heads=heads, kv_s=draw(st.sampled_from(kv)),
                kv_t=draw(st.sampled_from(kv)), length=draw(st.integers(1, 12)),
                d_s=draw(st.integers(1, 12)), d_t=draw(st.integers(1, 12)),
                mask=draw(st.sampled_from([None, "right", "left"])),
                layouts=[draw(st.sampled_from(QK_LAYOUTS)) for _ in range(5)],
                opts=dict(loss=draw(st.sampled_from(list(RA.ATTENTION_LOSSES))),
                          causal=draw(st.booleans()),
                          reduction=draw(st.sampled_from(list(RA.ATTENTION_REDUCTIONS))),
                          student_scale=draw(st.sampled_from([None, 0.3])),
                          teacher_scale=draw(st.sampled_from([None, 1.7]))),
                dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16])),
                scale=draw(st.sampled_from([1.0, 4.0])), seed=draw(st.integers(0, 10_000)),
                teacher_grad=draw(st.booleans()),
                grad_kind=draw(st.sampled_from(["one", "random", "negative"])))


def attention_property(backend, case):
    b, h, length = case["batch"], case["heads"], case["length"]
    seed, dtype = case["seed"], case["dtype"]
    sq, sk = TA.qk(b, h, case["kv_s"], length, case["d_s"], dtype, seed, scale=case["scale"])
    tq, tk = TA.qk(b, h, case["kv_t"], length, case["d_t"], dtype, seed + 2, scale=case["scale"])
    mask = TA.padding_mask(b, length, case["mask"], seed)
    layouts = case["layouts"]
    xs = [qk_layout(x, lay, seed + i) for i, (x, lay) in enumerate(zip((sq, sk, tq, tk), layouts))]
    if mask is not None:  # (B, L): no heads to move
        mask = as_layout(mask, "transposed" if layouts[4] == "heads-last" else layouts[4], seed)
    kw, teacher_grad = case["opts"], case["teacher_grad"]
    if backend == "triton" and kw["loss"] == "kl":  # a documented refusal (ValueError) there
        teacher_grad = False
    cfg = pdl.functional.attention_config(**kw)
    leaves = [x.detach().requires_grad_(i < 2 or teacher_grad) for i, x in enumerate(xs)]
    with tiles(backend, "attention_kd", "BLOCK_OVERRIDE", (16, 16)):
        loss = pdl.attention_kd_loss(*leaves, attention_mask=mask, backend=backend, **kw)
    grad_out = grad_out_for(loss.detach(), case["grad_kind"])
    wanted = [x for x in leaves if x.requires_grad]
    grads = torch.autograd.grad(loss, wanted, grad_out)
    x0, m0 = [dense(x) for x in xs], dense(mask)
    gt_loss, gt = TA.reference(x0, m0, cfg, grad_out, torch.float64)
    refs32 = [TA.reference(x0, m0, cfg, grad_out, torch.float32)]
    if backend != "torch":
        refs32.append(TA.reference_torch_backend(x0, m0, kw, grad_out))
    assert_loss(loss.detach(), gt_loss, [r[0] for r in refs32])
    half = dtype != torch.float32
    for i, g in enumerate(grads):
        assert g.dtype == dtype and g.shape == xs[i].shape
        atol = 2 * TS.OUT_EPS[dtype] * float(gt[i].abs().max()) if half else 0.0
        TS.assert_close(f"grad {TA.NAMES[i]}", g, gt[i], [r[1][i] for r in refs32], dtype,
                        atol=atol)


@pytest.mark.parametrize("backend", backends("attention_kd_loss"))
def test_attention_kd_loss_layouts(backend):
    run_property(backend, attention_cases(), attention_property, 20)

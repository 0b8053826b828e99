"""Offline teachers in the loss: a batch's stored temperature and method, the sampled teacher's
unbiased estimator, ignored rows that hold anything, and log-probs that cannot be log-probs.

The stored teacher is a stand-in for ``pydistill.offline``'s store and collator (``make_store``
/ ``collate``): items and batches shaped exactly as theirs (right padding, ids 0 and log-probs
-inf at the pads, labels -100 there and unshifted). The math comes from the reference modules:
a sampled teacher's gradient is that of ``kd_loss`` against the dense empirical distribution,
its value that plus T^2 H(p^).
"""
import math

import pytest
import torch

import pydistill as pdl
from pydistill import _validation as check
from pydistill.ops.sampled_kd import sampled_support
from pydistill.reference import softmax_divergence as RK
from pydistill.reference import topk_divergence as RT

from conftest import DEVICE, available_backends
from test_host_sync import device_tensors_from_host  # noqa: F401  (a fixture)
from test_softmax_divergence import _gen, logits, make_labels

BACKENDS = available_backends("topk_kd_loss")
LINEAR_BACKENDS = available_backends("linear_kd_loss")
F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# a stand-in store: pydistill.offline's item and batch layout
# ---------------------------------------------------------------------------------------------


def sample_teacher(teacher_logits, temperature, samples, gen):
    """S ids drawn i.i.d. from softmax(teacher_logits / T) per row, as a store keeps them:
    (ids (..., S) int64, log(count / S) float32, counts int64), the distinct ids first in
    descending count, unused slots id 0, log-prob -inf, count 0."""
    lead, vocab = teacher_logits.shape[:-1], teacher_logits.shape[-1]
    p = torch.softmax(teacher_logits.double().reshape(-1, vocab) / temperature, -1).cpu()
    draws = torch.multinomial(p, samples, replacement=True, generator=gen)
    counts = torch.zeros(p.shape, dtype=torch.int64).scatter_add_(1, draws, torch.ones_like(draws))
    c, ids = counts.topk(samples, dim=-1)
    ids = torch.where(c > 0, ids, 0)
    lp = torch.where(c > 0, (c.double() / samples).log(), -math.inf).float()
    shape = lead + (samples,)
    return (ids.reshape(shape).to(DEVICE), lp.reshape(shape).to(DEVICE), c.reshape(shape).to(DEVICE))


def make_store(teacher_logits_fn, sequences, *, k, temperature=1.0, method="topk", samples=None,
               seed=0):
    """(items, manifest) for token sequences: per item ``input_ids`` (L,), ``teacher_ids`` (L, K)
    and ``teacher_logprobs`` (L, K) of the teacher's next-token distribution at each position
    (top-k of log_softmax(logits / T), or S draws for ``method="sample"``, then with
    ``teacher_counts``)."""
    gen = _gen(seed)
    items = []
    for ids in sequences:
        t = teacher_logits_fn(ids)  # (L, V)
        if method == "topk":
            lp, idx = torch.log_softmax(t.double() / temperature, -1).topk(k, dim=-1)
            items.append({"input_ids": ids, "teacher_ids": idx, "teacher_logprobs": lp.float()})
        else:
            idx, lp, counts = sample_teacher(t, temperature, samples, gen)
            items.append({"input_ids": ids, "teacher_ids": idx, "teacher_logprobs": lp,
                          "teacher_counts": counts})
    vocab = teacher_logits_fn(sequences[0]).shape[-1]
    manifest = {"temperature": temperature, "method": method, "k": k if method == "topk" else samples,
                "vocab_size": vocab, "samples": samples, "proposal_temperature": temperature}
    return items, manifest


def collate(items, manifest, pad_id=0):
    """OfflineCollator's batch: right-padded to the longest item, labels = input_ids with -100
    at the pads (unshifted), teacher pads ids 0 / log-probs -inf."""
    length = max(len(x["input_ids"]) for x in items)
    k = items[0]["teacher_ids"].shape[-1]
    b = len(items)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long, device=DEVICE)
    mask = torch.zeros((b, length), dtype=torch.long, device=DEVICE)
    ids = torch.zeros((b, length, k), dtype=torch.long, device=DEVICE)
    lp = torch.full((b, length, k), -math.inf, dtype=torch.float32, device=DEVICE)
    for i, x in enumerate(items):
        n = len(x["input_ids"])
        input_ids[i, :n], mask[i, :n] = x["input_ids"], 1
        ids[i, :n], lp[i, :n] = x["teacher_ids"], x["teacher_logprobs"]
    labels = input_ids.masked_fill(mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "teacher_ids": ids,
            "teacher_logprobs": lp, "teacher_temperature": float(manifest["temperature"]),
            "teacher_method": manifest["method"]}


def shifted(labels):
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=-100)


def dense_log_probs(lp, ids, vocab):
    """A (…, K) teacher as dense (…, V) log-probs, -inf off its listed ids."""
    dense = torch.full(lp.shape[:-1] + (vocab,), -math.inf, dtype=F64, device=lp.device)
    return dense.scatter(-1, ids.long(), lp.double())


def sampled_reference(s, lp, ids, labels, temperature, reduction="mean", hard_weight=0.0):
    """The sampled teacher's loss and gradient from the reference: kd_loss (forward KL) against
    the dense empirical distribution, plus T^2 H(p^) on the counted rows."""
    s = s.detach().double().requires_grad_()
    log_p = dense_log_probs(lp, ids, s.shape[-1])
    cfg = RK.KDConfig(temperature=temperature, reduction=reduction, hard_weight=hard_weight)
    loss = RK.kd_loss(s, log_p * temperature, labels, cfg)  # teacher logits: softmax(./T) = p^
    g, = torch.autograd.grad(loss.sum(), s)
    h = -torch.where(log_p > -math.inf, log_p.exp() * log_p, 0.0).sum(-1)
    counted = labels != -100 if labels is not None else torch.ones_like(h, dtype=torch.bool)
    rows = temperature ** 2 * torch.where(counted, h, 0.0)
    return loss.detach() + RK.reduce_rows(rows, counted.sum(), reduction), g


# ---------------------------------------------------------------------------------------------
# (a) the stored temperature and method travel with the batch
# ---------------------------------------------------------------------------------------------


def _topk_batch(temperature=2.0, method="topk", k=4, vocab=23, seed=0):
    w = logits((vocab, 5), seed=seed + 40) / 3

    def teacher(ids):
        return torch.nn.functional.one_hot(ids, vocab).float() @ w @ w.T * 2.0

    seqs = [torch.randint(0, vocab, (n,), generator=_gen(seed + n)).to(DEVICE) for n in (6, 4)]
    items, manifest = make_store(teacher, seqs, k=k, temperature=temperature, method=method,
                                 samples=k, seed=seed)
    return collate(items, manifest)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stored_temperature_reaches_topk_kd_loss(backend):
    batch = _topk_batch(temperature=2.0)
    s = logits(batch["teacher_ids"].shape[:-1] + (23,), seed=3)
    y = shifted(batch["labels"])
    want = pdl.topk_kd_loss(s, batch["teacher_logprobs"], batch["teacher_ids"], labels=y,
                            teacher_temperature=2.0, temperature=2.0, backend=backend)
    for requested in (None, 2.0):
        got = pdl.offline_kd_loss(s, batch, temperature=requested, backend=backend)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError) as info:
        pdl.offline_kd_loss(s, batch, temperature=1.0, backend=backend)
    for word in ("temperature", "2.0", "temperature=1.0", "re-tempered"):
        assert word in str(info.value), info.value


def test_stored_teacher_bad_batch():
    batch = _topk_batch()
    s = logits(batch["teacher_ids"].shape[:-1] + (23,), seed=3)
    for drop, words in (("teacher_temperature", ["teacher_temperature", "missing"]),
                        ("teacher_method", ["teacher_method", "missing"])):
        bad = {k: v for k, v in batch.items() if k != drop}
        with pytest.raises(ValueError) as info:
            pdl.offline_kd_loss(s, bad)
        assert all(w in str(info.value) for w in words), info.value
    with pytest.raises(ValueError, match=r"teacher_method.*'topk'.*'dense'"):
        pdl.offline_kd_loss(s, dict(batch, teacher_method="dense"))
    with pytest.raises(TypeError, match=r"teacher: expected a mapping"):
        pdl.offline_kd_loss(s, [batch["teacher_logprobs"], batch["teacher_ids"]])
    sampled = _topk_batch(method="sample")
    with pytest.raises(ValueError, match=r"tail: applies to a top-k teacher.*'bucket'"):
        pdl.offline_kd_loss(s, sampled, tail="bucket")
    with pytest.raises(ValueError, match=r"divergence: .*forward KL only, expected 'kl', got 'jsd'"):
        pdl.offline_kd_loss(s, sampled, divergence="jsd")
    weighted = dict(sampled, teacher_log_weights=torch.zeros_like(sampled["teacher_logprobs"]))
    with pytest.raises(ValueError, match=r"teacher_log_weights .*proposal_temperature equal to"):
        pdl.offline_kd_loss(s, weighted)
    with pytest.raises(ValueError, match=r"teacher_temperature: .*cannot be re-tempered"):
        pdl.sampled_kd_loss(s, sampled["teacher_logprobs"], sampled["teacher_ids"],
                            teacher_temperature=2.0, temperature=1.0)


@pytest.mark.parametrize("method", ["topk", "sample"])
@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_linear_offline_equals_logits_form(method, backend):
    # the fused head against the same loss on the formed logits; labels from the batch, shifted
    batch = _topk_batch(temperature=1.5, method=method, k=6)
    lead = batch["teacher_ids"].shape[:-1]
    h, w = logits(lead + (7,), seed=11) / 2, logits((23, 7), seed=12) / 2
    h, w = h.requires_grad_(), w.requires_grad_()
    kw = dict(hard_weight=0.3, soft_weight=0.7, backend=backend)
    loss, parts = pdl.linear_offline_kd_loss(h, w, batch, chunk_size=5, return_components=True, **kw)
    g = torch.autograd.grad(loss, [h, w])
    h2, w2 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = pdl.offline_kd_loss(h2 @ w2.T, batch, **{**kw, "backend": "torch"})
    g2 = torch.autograd.grad(want, [h2, w2])
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, g2):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, 0.7 * parts["kd"] + 0.3 * parts["ce"], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# (b) the sampled teacher
# ---------------------------------------------------------------------------------------------


def test_sampled_support_moves_unused_slots():
    ids = torch.tensor([[0, 3, 0, 0], [5, 1, 0, 0], [2, 0, 1, 3], [0, 0, 0, 0]])
    lp = torch.tensor([[-0.1, -2.0, -math.inf, -math.inf], [-1.0, -0.5, -math.inf, -math.inf],
                       [-1.0, -2.0, -2.0, -2.0], [-math.inf] * 4])
    for vocab in (6, 4, 40):  # V = K: the candidates are the whole vocabulary
        if vocab < 6 and bool((ids >= vocab).any()):
            keep = (ids < vocab).all(-1)
            i, l = ids[keep], lp[keep]
        else:
            i, l = ids, lp
        out = sampled_support(l, i, vocab)
        used = l > -math.inf
        assert torch.equal(out[used], i[used])  # drawn ids untouched
        srt = out.sort(-1).values
        assert bool((srt[:, 1:] != srt[:, :-1]).all()), out  # distinct within every row
        assert bool(((out >= 0) & (out < vocab)).all())
    assert sampled_support(lp, ids.int(), 40).dtype == torch.int32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sampled_kd_loss_against_reference(backend, reduction):
    # loss = kd_loss against the dense empirical distribution + T^2 H(p^); the gradient is
    # kd_loss's. Padding rows (ignored) hold duplicates, out-of-range ids and raw logits.
    vocab, samples, temperature = 19, 6, 1.7
    t = logits((2, 5, vocab), seed=21)
    ids, lp, _ = sample_teacher(t, temperature, samples, _gen(22))
    y = make_labels((2, 5), vocab, ignore=(1, 7, 9), seed=23)
    ids.view(-1, samples)[7] = torch.tensor([0, 0, -3, vocab + 4, 2, 2])
    lp.view(-1, samples)[7] = torch.tensor([9.0, 4.0, math.nan, 1.0, 0.5, 30.0])
    s = logits((2, 5, vocab), seed=24).requires_grad_()
    loss = pdl.sampled_kd_loss(s, lp, ids, teacher_temperature=temperature,
                               temperature=temperature, labels=y, hard_weight=0.4,
                               reduction=reduction, backend=backend)
    g, = torch.autograd.grad(loss.sum(), s)
    ok = y != -100
    lp_ref = torch.where(ok[..., None], lp, -math.inf)  # the reference reads every row
    ids_ref = torch.where(ok[..., None], sampled_support(lp, ids, vocab), 0)
    want, want_g = sampled_reference(s, lp_ref, ids_ref, y, temperature, reduction, hard_weight=0.4)
    torch.testing.assert_close(loss.double(), want, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(g.double(), want_g, rtol=2e-4, atol=2e-6)


def _mean_sampled_gradient(s, t, temperature, samples, reps, seed, method="sample"):
    """The mean over ``reps`` independent samplings of the gradient of the summed per-row
    losses w.r.t. the student logits (float64, the torch backend; all repetitions as one
    batch of reps x N rows)."""
    n, vocab = s.shape
    ids, lp, _ = sample_teacher(t.repeat(reps, 1), temperature, samples, _gen(seed))
    x = s.detach().double().repeat(reps, 1).requires_grad_()
    if method == "sample":
        loss = pdl.sampled_kd_loss(x, lp, ids, teacher_temperature=temperature,
                                   temperature=temperature, reduction="sum", backend="torch")
    else:  # the drawn support renormalised: a biased estimator, which the test must reject
        ids = sampled_support(lp, ids, vocab)
        loss = pdl.topk_kd_loss(x, lp, ids, tail="renormalize", teacher_temperature=temperature,
                                temperature=temperature, reduction="sum", backend="torch")
    g, = torch.autograd.grad(loss, x)
    return g.reshape(reps, n, vocab).mean(0)


def test_sampled_gradient_is_unbiased():
    # The mean gradient over R samplings of S draws converges to the dense forward-KL gradient
    # (q - p) T (t2: T^2 / T) with error sd_j = T sqrt(p_j (1 - p_j) / (S R)): its RMS over the
    # entries matches that prediction at R = 100 and R = 400 (so it shrinks as 1 / sqrt(S R):
    # a bias would leave a floor), and a biased estimator (the drawn support renormalised) fails.
    n, vocab, samples, temperature = 8, 16, 12, 1.5
    s = logits((n, vocab), F64, scale=1.0, seed=31).cpu()
    t = logits((n, vocab), F64, scale=1.5, seed=32).cpu()
    x = s.clone().requires_grad_()
    cfg = RK.KDConfig(temperature=temperature, reduction="sum")
    dense, = torch.autograd.grad(RK.kd_loss(x, t, None, cfg), x)
    p = torch.softmax(t / temperature, -1)

    def rms_ratio(reps, seed, method="sample"):
        err = _mean_sampled_gradient(s, t, temperature, samples, reps, seed, method) - dense
        predicted = temperature * (p * (1 - p) / (samples * reps)).sqrt()
        return err.pow(2).mean().sqrt().item(), predicted.pow(2).mean().sqrt().item()

    e100, sd100 = rms_ratio(100, 1)
    e400, sd400 = rms_ratio(400, 2)
    assert 0.75 < e100 / sd100 < 1.3, (e100, sd100)
    assert 0.75 < e400 / sd400 < 1.3, (e400, sd400)
    assert 1.6 < e100 / e400 < 2.5, (e100, e400)  # sqrt(400 / 100) = 2
    biased, sd = rms_ratio(400, 2, method="renormalize")
    assert biased / sd > 3.0, (biased, sd)


def test_sampled_value_estimates_cross_entropy():
    # E[loss_i] = T^2 (H(p) + KL(p || q)): the mean over R samplings within 4 standard errors
    n, vocab, samples, temperature, reps = 4, 16, 12, 1.5, 400
    s = logits((n, vocab), F64, scale=1.0, seed=41).cpu()
    t = logits((n, vocab), F64, scale=1.5, seed=42).cpu()
    ids, lp, _ = sample_teacher(t.repeat(reps, 1), temperature, samples, _gen(43))
    rows = pdl.sampled_kd_loss(s.repeat(reps, 1), lp, ids, teacher_temperature=temperature,
                               temperature=temperature, reduction="none",
                               backend="torch").reshape(reps, n)
    kl = RK.kd_loss(s, t, None, RK.KDConfig(temperature=temperature, reduction="none"))
    log_p = torch.log_softmax(t / temperature, -1)
    want = kl + temperature ** 2 * -(log_p.exp() * log_p).sum(-1)
    se = rows.std(0) / math.sqrt(reps)
    assert bool(((rows.mean(0) - want).abs() < 4 * se).all()), (rows.mean(0), want, se)


def test_sampled_loss_makes_no_device_tensor_from_host(device_tensors_from_host):  # noqa: F811
    batch = _topk_batch(method="sample", k=5)
    s = logits(batch["teacher_ids"].shape[:-1] + (23,), seed=3).requires_grad_()
    loss = pdl.offline_kd_loss(s, batch, backend="torch")
    torch.autograd.grad(loss, s)
    h, w = logits(batch["teacher_ids"].shape[:-1] + (7,), seed=5), logits((23, 7), seed=6)
    pdl.linear_offline_kd_loss(h, w.requires_grad_(), batch, backend="torch")
    assert device_tensors_from_host == [], device_tensors_from_host


# ---------------------------------------------------------------------------------------------
# (c) rows ignored by labels may hold anything; (d) log-probs that cannot be log-probs
# ---------------------------------------------------------------------------------------------


def _garbage_rows(lp, ids, rows, vocab):
    lp, ids = lp.clone(), ids.clone()
    k = ids.shape[-1]
    for r in rows:
        ids.view(-1, k)[r] = torch.tensor([-7, vocab + 3, 0, 0][:k] + [0] * (k - 4))
        lp.view(-1, k)[r] = torch.tensor([12.0, math.nan, 5.0, -math.inf][:k] + [1.0] * (k - 4))
    return lp, ids


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_ignored_rows_hold_anything(backend):
    vocab, k = 21, 4
    t = logits((3, 4, vocab), seed=51)
    lp, ids = torch.log_softmax(t, -1).topk(k, -1)
    y = make_labels((3, 4), vocab, ignore=(2, 5, 11), seed=52)
    bad_lp, bad_ids = _garbage_rows(lp, ids, (2, 5, 11), vocab)
    s = logits((3, 4, vocab), seed=53).requires_grad_()
    kw = dict(labels=y, teacher_temperature=1.0, hard_weight=0.5, backend=backend)
    got = pdl.topk_kd_loss(s, bad_lp, bad_ids, **kw)
    g, = torch.autograd.grad(got, s)
    want = pdl.topk_kd_loss(s, lp, ids, **kw)
    want_g, = torch.autograd.grad(want, s)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(g, want_g, rtol=0, atol=0)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_linear_topk_ignored_rows_hold_anything(backend):
    # a collated batch's padding rows (ids 0 repeated, -inf) and worse are never read
    vocab, k = 21, 4
    lp, ids = torch.log_softmax(logits((2, 5, vocab), seed=61), -1).topk(k, -1)
    y = make_labels((2, 5), vocab, ignore=(3, 4, 9), seed=62)
    bad_lp, bad_ids = _garbage_rows(lp, ids, (3, 9), vocab)
    bad_ids.view(-1, k)[4], bad_lp.view(-1, k)[4] = 0, -math.inf
    h, w = logits((2, 5, 6), seed=63).requires_grad_(), logits((vocab, 6), seed=64).requires_grad_()
    kw = dict(labels=y, teacher_temperature=1.0, chunk_size=3, backend=backend)
    got = pdl.linear_kd_loss(h, w, teacher_topk=(bad_lp, bad_ids), **kw)
    g = torch.autograd.grad(got, [h, w])
    want = pdl.linear_kd_loss(h, w, teacher_topk=(lp, ids), **kw)
    want_g = torch.autograd.grad(want, [h, w])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(g, want_g):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ignored_rows_are_not_validated_but_counted_rows_are():
    vocab = 9
    s = logits((4, vocab), seed=71)
    lp, ids = torch.log_softmax(logits((4, vocab), seed=72), -1).topk(3, -1)
    ids[2] = torch.tensor([0, vocab, -1])
    y = torch.tensor([1, 2, -100, 3], device=DEVICE)
    pdl.topk_kd_loss(s, lp, ids, labels=y, teacher_temperature=1.0)
    with pytest.raises(ValueError, match=r"teacher_topk_indices: expected values in \[0, 9\), got 9 "
                                         r"\(in row 2 of the rows flattened\)"):
        pdl.topk_kd_loss(s, lp, ids, labels=torch.tensor([1, 2, 0, 3], device=DEVICE),
                         teacher_temperature=1.0)


LOGPROB_CASES = [
    # (log-probs of row 1, words of the message)
    (lambda ids, t: t.gather(-1, ids)[1],  # the raw logits of the top-k
     ["expected log-probabilities", "<= 0", "row 1", "raw logits"]),
    (lambda ids, t: torch.full((3,), math.log(0.6)),  # each <= 0, summing to 1.8
     ["sum to at most 1", "summing to 1.8", "logsumexp 0.587787", "row 1"]),
    (lambda ids, t: torch.tensor([0.5, -1.0, -2.0]), ["got 0.5 in row 1"]),
    (lambda ids, t: torch.tensor([math.inf, -1.0, -2.0]), ["got inf in row 1"]),
]


@pytest.mark.parametrize("case", range(len(LOGPROB_CASES)))
def test_not_logprobs_refused(case):
    make, words = LOGPROB_CASES[case]
    vocab = 11
    t = logits((3, vocab), seed=81)
    lp, ids = torch.log_softmax(t, -1).topk(3, -1)
    lp = lp.clone()
    lp[1] = make(ids, t)
    s = logits((3, vocab), seed=82)
    with pytest.raises(ValueError) as info:
        pdl.topk_kd_loss(s, lp, ids, teacher_temperature=1.0)
    assert "teacher_topk_logprobs" in str(info.value)
    for w in words:
        assert w in str(info.value), info.value
    with pytest.raises(ValueError) as info:
        pdl.linear_kd_loss(logits((3, 4), seed=83), logits((vocab, 4), seed=84),
                           teacher_topk=(lp, ids), teacher_temperature=1.0)
    assert "teacher_topk[0] (logprobs)" in str(info.value)
    # not read where labels ignore the row
    y = torch.tensor([0, -100, 2], device=DEVICE)
    assert torch.isfinite(pdl.topk_kd_loss(s, lp, ids, labels=y, teacher_temperature=1.0))


def test_logprobs_rounding_accepted():
    # quantised / float16 log-probs a little above 0 (a store's 0.01-nat error) are log-probs
    vocab = 11
    t = logits((3, vocab), seed=91)
    t[:, 4] = 40.0  # nearly one-hot rows: log-probs just below 0
    lp, ids = torch.log_softmax(t, -1).topk(3, -1)
    lp = (lp + 0.01).half().float()
    assert float(lp.max()) > 0 and float(torch.logsumexp(lp, -1).max()) > 0
    pdl.topk_kd_loss(logits((3, vocab), seed=92), lp, ids, teacher_temperature=1.0)
    assert check.LOGPROB_SLACK >= 0.01


def test_validate_checks_on_request_only_off_cpu():
    # a tensor the default does not check (off the CPU; meta has no values at all) is checked
    # with check_values=True, which offline_kd_loss(validate=True) passes for any device
    lp, ids = torch.zeros(2, 3, device="meta"), torch.zeros(2, 3, dtype=torch.long, device="meta")
    s = torch.empty(2, 5, device="meta")
    check.topk_inputs("s", s, "lp", lp, "ids", ids)  # no value read
    with pytest.raises((NotImplementedError, RuntimeError)):
        check.topk_inputs("s", s, "lp", lp, "ids", ids, check_values=True)
    batch = _topk_batch()
    s = logits(batch["teacher_ids"].shape[:-1] + (23,), seed=3)
    raw = dict(batch, teacher_logprobs=batch["teacher_logprobs"] + 5.0)
    with pytest.raises(ValueError, match="teacher\\['teacher_logprobs'\\]: expected log-probabilities"):
        pdl.offline_kd_loss(s, raw, validate=True)

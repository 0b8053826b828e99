"""DistillationObjective: weighted sum, per-term logs, EMA rebalancing, validation."""
import pytest
import torch
import torch.nn.functional as F

import pydistill as pdl


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(6, 11, generator=g, requires_grad=True)
    t = torch.randn(6, 11, generator=g)
    y = torch.randint(0, 11, (6,), generator=g)
    return s, t, y


def test_weighted_sum_and_logs():
    s, t, y = _inputs()
    obj = pdl.DistillationObjective(
        {"kd": pdl.KDLoss(temperature=2.0), "ce": F.cross_entropy, "l2": None},
        weights={"kd": 5.0, "ce": 2.0},
    )
    l2 = (s ** 2).mean()
    total, logs = obj(kd=(s, t), ce={"input": s, "target": y}, l2=l2)
    kd = pdl.kd_loss(s, t, temperature=2.0)
    ce = F.cross_entropy(s, y)
    want = 5.0 * kd + 2.0 * ce + 1.0 * l2
    torch.testing.assert_close(total, want)
    assert set(logs) == {"kd", "ce", "l2", "total"}
    torch.testing.assert_close(logs["kd"], kd.detach())
    torch.testing.assert_close(logs["ce"], ce.detach())
    torch.testing.assert_close(logs["total"], want.detach())
    assert not any(v.requires_grad for v in logs.values())
    (g,) = torch.autograd.grad(total, s)
    s2 = s.detach().clone().requires_grad_()
    (g_want,) = torch.autograd.grad(5.0 * pdl.kd_loss(s2, t, temperature=2.0) + 2.0 * F.cross_entropy(s2, y)
                                    + (s2 ** 2).mean(), s2)
    torch.testing.assert_close(g, g_want)
    assert "kd" in dict(obj.named_children())["terms"]._modules  # modules are submodules
    assert obj.effective_weights == {"kd": 5.0, "ce": 2.0, "l2": 1.0}


def test_ema_rebalancing_gives_target_shares():
    obj = pdl.DistillationObjective({"a": None, "b": None}, weights={"a": 3.0, "b": 1.0},
                                    rebalance="ema", momentum=0.5)
    x = torch.tensor(1.0, requires_grad=True)
    # first call: magnitudes are the values themselves
    total, logs = obj(a=10.0 * x, b=0.1 * x)
    m = torch.tensor([10.0, 0.1])
    scale = (torch.tensor([3.0, 1.0]) * m).sum()
    e = torch.tensor([0.75, 0.25]) * scale / m
    torch.testing.assert_close(total, e[0] * 10.0 + e[1] * 0.1)
    # each weighted term holds its share of the total
    torch.testing.assert_close(e * m / (e * m).sum(), torch.tensor([0.75, 0.25]))
    (g,) = torch.autograd.grad(total, x)  # the weights are constants for autograd
    torch.testing.assert_close(g, e[0] * 10.0 + e[1] * 0.1)
    # second call: EMA with momentum 0.5
    obj(a=torch.tensor(20.0), b=torch.tensor(-0.3))
    torch.testing.assert_close(obj.magnitudes, torch.tensor([15.0, 0.2]))
    eff = obj.effective_weights
    m = torch.tensor([15.0, 0.2])
    want = torch.tensor([0.75, 0.25]) * (torch.tensor([3.0, 1.0]) * m).sum() / m
    assert eff["a"] == pytest.approx(float(want[0])) and eff["b"] == pytest.approx(float(want[1]))
    # eval mode: no update
    obj.eval()
    obj(a=torch.tensor(1000.0), b=torch.tensor(1000.0))
    torch.testing.assert_close(obj.magnitudes, torch.tensor([15.0, 0.2]))
    state = obj.state_dict()
    assert "magnitudes" in state and "initialised" in state


def test_rebalancing_in_a_training_loop_equalises_terms():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8))
    obj = pdl.DistillationObjective({"big": None, "small": None}, rebalance="ema", momentum=0.8)
    opt = torch.optim.SGD([w], lr=1e-3)
    for _ in range(20):
        total, logs = obj(big=1000 * (w ** 2).sum(), small=1e-3 * (w - 1).abs().sum())
        opt.zero_grad()
        total.backward()
        opt.step()
    eff = obj.effective_weights
    m = obj.magnitudes
    assert float(eff["big"] * m[0]) == pytest.approx(float(eff["small"] * m[1]), rel=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(terms={}), "non-empty"),
    (dict(terms={"total": None}), "identifiers other than 'total'"),
    (dict(terms={"a": 3}), "callable"),
    (dict(terms={"a": None}, weights={"b": 1.0}), "not terms"),
    (dict(terms={"a": None}, weights={"a": -1.0}), "finite number >= 0"),
    (dict(terms={"a": None}, rebalance="grad"), "rebalance"),
    (dict(terms={"a": None}, rebalance="ema", momentum=1.0), "momentum"),
    (dict(terms={"a": None}, weights={"a": 0.0}, rebalance="ema"), "positive weight"),
])
def test_bad_construction(kwargs, match):
    terms = kwargs.pop("terms")
    with pytest.raises((ValueError, TypeError), match=match):
        pdl.DistillationObjective(terms, **kwargs)


def test_bad_call():
    obj = pdl.DistillationObjective({"a": lambda x: x.sum(), "b": None})
    with pytest.raises(ValueError, match="missing \\['b'\\]"):
        obj(a=(torch.ones(2),))
    with pytest.raises(ValueError, match="unknown \\['c'\\]"):
        obj(a=(torch.ones(2),), b=torch.tensor(1.0), c=torch.tensor(1.0))
    with pytest.raises(TypeError, match="no callable"):
        obj(a=(torch.ones(2),), b=(torch.ones(2),))
    with pytest.raises(ValueError, match="scalar"):
        obj(a=(torch.ones(2),), b=torch.ones(3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_ema_skips_non_finite_terms(bad):
    """A non-finite term shows in that step's logs and total but not in the running
    magnitudes: each term's magnitude, and the later steps, are those of a run that never saw
    it (the other term's value of that step still counts)."""
    def run(steps):
        obj = pdl.DistillationObjective({"a": None, "b": None}, weights={"a": 3.0, "b": 1.0},
                                        rebalance="ema", momentum=0.5)
        out = [obj(a=torch.tensor(a), b=torch.tensor(b)) for a, b in steps]
        return obj, out

    clean, clean_out = run([(10.0, 0.1), (20.0, 0.3), (4.0, 0.2)])
    obj, out = run([(10.0, 0.1), (20.0, bad), (bad, 0.3), (4.0, 0.2)])
    for total, logs in out[1:3]:  # the bad steps: visible
        assert not torch.isfinite(total) and not torch.isfinite(logs["total"])
        assert not all(torch.isfinite(logs[k]) for k in ("a", "b"))
    torch.testing.assert_close(obj.magnitudes, clean.magnitudes)
    torch.testing.assert_close(out[3][0], clean_out[2][0])
    torch.testing.assert_close(out[3][1]["total"], clean_out[2][1]["total"])
    assert obj.effective_weights == pytest.approx(clean.effective_weights)


def test_ema_non_finite_first_value():
    """A term whose first value is not finite stays uninitialised (weighted as magnitude 1 in
    that step, so the other terms' weights stay finite) and starts from its first finite one."""
    obj = pdl.DistillationObjective({"a": None, "b": None}, rebalance="ema", momentum=0.5)
    x = torch.tensor(1.0, requires_grad=True)
    total, logs = obj(a=2.0 * x, b=torch.tensor(float("nan")))
    assert torch.isnan(total) and torch.isnan(logs["b"])
    assert obj.initialised.tolist() == [True, False]
    assert obj.effective_weights == pytest.approx({"a": 0.75, "b": 1.5})  # m = (2, 1)
    total, _ = obj(a=torch.tensor(4.0), b=torch.tensor(8.0))
    torch.testing.assert_close(obj.magnitudes, torch.tensor([3.0, 8.0]))
    m = torch.tensor([3.0, 8.0])
    e = 0.5 * m.sum() / m
    torch.testing.assert_close(total, e[0] * 4.0 + e[1] * 8.0)


def test_ema_state_with_one_initialised_flag_loads():
    obj = pdl.DistillationObjective({"a": None, "b": None}, rebalance="ema")
    state = {"magnitudes": torch.tensor([2.0, 4.0]), "initialised": torch.tensor(True)}
    obj.load_state_dict(state)
    assert obj.initialised.tolist() == [True, True]
    assert obj.effective_weights == pytest.approx({"a": 1.5, "b": 0.75})

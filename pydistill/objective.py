"""A composite distillation objective: named loss terms, weighted, summed, logged.

The recipes that work best combine several terms (DistilBERT: 5 KD + 2 MLM + 1 cosine;
TinyBERT: attention + hidden + prediction). ``DistillationObjective`` holds the terms and
their weights, returns the weighted sum and every term's detached value for logging, and can
rebalance the weights from the terms' running magnitudes so that each weighted term keeps a
chosen share of the total.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Optional

import torch
from torch import nn

__all__ = ["DistillationObjective"]

REBALANCE = ("none", "ema")


class DistillationObjective(nn.Module):
    r"""Weighted sum of named loss terms, with per-term logging and optional rebalancing.

    ::

        objective = pdl.DistillationObjective(
            {"kd": pdl.KDLoss(temperature=2.0), "ce": torch.nn.CrossEntropyLoss(),
             "cos": lambda hs, ht: 1 - F.cosine_similarity(hs, ht, dim=-1).mean()},
            weights={"kd": 5.0, "ce": 2.0, "cos": 1.0})                 # DistilBERT's mix
        total, logs = objective(kd=(s, t), ce=(s, y), cos=(hs, ht))
        total.backward()          # logs: {"kd": ..., "ce": ..., "cos": ..., "total": ...}

    Each keyword of the call names a term and gives its inputs: a tuple (positional
    arguments), a dict (keyword arguments), or a tensor that is already the term's value (then
    the term's callable may be ``None``). Every term must be given, every value must be a
    scalar (use a reduction other than ``"none"``).

    ``total = sum_k w_k * v_k``. The returned dict holds each term's unweighted value ``v_k``
    and the total, detached (tensors on the loss's device: reading them with ``.item()`` is
    the caller's choice of when to synchronise).

    Rebalancing (``rebalance="ema"``): the weights are read as target *shares*
    ``s_k = w_k / sum_j w_j``. A running magnitude ``m_k`` of each term is kept, an
    exponential moving average of ``|v_k|`` (``m_k <- momentum * m_k + (1 - momentum) * |v_k|``,
    initialised to the first finite value seen), updated in training mode only. The effective
    weights are

        e_k = s_k * (sum_j w_j m_j) / m_k

    so that ``e_k m_k = s_k * sum_j w_j m_j``: at the running magnitudes every weighted term
    holds its share ``s_k`` of the total, and the total is as large as the unbalanced weighted
    sum, so the learning rate keeps its meaning. The effective weights are constants for
    autograd (computed from detached values); the current ones are in :attr:`effective_weights`
    and the magnitudes are buffers (saved in ``state_dict``). No host synchronisation: the
    first-call initialisation is a ``torch.where`` on per-term flags, and the weights live on
    the device as a buffer made at construction. With ``rebalance="none"`` (default) the
    weights are used as given.

    Non-finite terms (a NaN or infinite loss, e.g. one overflowing step under mixed precision)
    do not enter the running magnitudes: that term's update is skipped for the step (its
    magnitude keeps its last finite value, or stays uninitialised), so one bad step cannot
    make every later total NaN. The step itself still shows it: the term's value in the logs
    and the total are non-finite, as without rebalancing (skip or clip that step as you would
    without it). A term with no finite magnitude yet is weighted as if its magnitude were 1 in
    that step, so the other effective weights stay finite.

    Args:
        terms: mapping name -> callable (a pydistill loss module, any ``nn.Module`` or function
            returning a scalar tensor), or ``None`` for a term whose value is passed in.
            Modules are registered as submodules (``objective.terms[name]``).
        weights: mapping name -> weight (default 1 for a name not given). Non-negative and
            finite; with rebalancing at least one must be positive.
        rebalance: ``"none"`` or ``"ema"``.
        momentum: EMA momentum in [0, 1) for ``"ema"`` (default 0.9).
        eps: floor of the running magnitudes (a term that is exactly 0 keeps a finite weight).
    """

    def __init__(self, terms: Mapping[str, Optional[Callable]],
                 weights: Optional[Mapping[str, float]] = None, *, rebalance: str = "none",
                 momentum: float = 0.9, eps: float = 1e-8):
        super().__init__()
        if not isinstance(terms, Mapping) or not terms:
            raise ValueError(f"terms: expected a non-empty mapping name -> loss, got {terms!r}")
        weights = dict(weights or {})
        for name, fn in terms.items():
            if not isinstance(name, str) or not name.isidentifier() or name == "total":
                raise ValueError(f"terms: names must be identifiers other than 'total', got {name!r}")
            if fn is not None and not callable(fn):
                raise TypeError(f"terms[{name!r}]: expected a callable or None, got {type(fn).__name__}")
        unknown = set(weights) - set(terms)
        if unknown:
            raise ValueError(f"weights: names {sorted(unknown)} are not terms ({list(terms)})")
        for name, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"weights[{name!r}]: expected a finite number >= 0, got {w!r}")
        if rebalance not in REBALANCE:
            raise ValueError(f"rebalance: expected one of {REBALANCE}, got {rebalance!r}")
        if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
            raise ValueError(f"momentum: expected a number in [0, 1), got {momentum!r}")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"eps: expected a number > 0, got {eps!r}")
        self.names = list(terms)
        self.terms = nn.ModuleDict({k: v for k, v in terms.items() if isinstance(v, nn.Module)})
        self._functions = {k: v for k, v in terms.items() if not isinstance(v, nn.Module)}
        self.weights = {k: float(weights.get(k, 1.0)) for k in self.names}
        if rebalance == "ema" and sum(self.weights.values()) <= 0:
            raise ValueError("weights: rebalancing needs at least one positive weight")
        self.rebalance = rebalance
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.register_buffer("magnitudes", torch.zeros(len(self.names), dtype=torch.float32))
        # per term: whether its magnitude holds a finite value yet
        self.register_buffer("initialised", torch.zeros(len(self.names), dtype=torch.bool))
        # the weights on the loss's device, made once (no host-to-device copy per call)
        self.register_buffer("weight_vector", torch.tensor([self.weights[k] for k in self.names],
                                                           dtype=torch.float32), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # state saved when ``initialised`` was one flag for all the terms
        key = prefix + "initialised"
        flag = state_dict.get(key)
        if isinstance(flag, torch.Tensor) and flag.dim() == 0:
            state_dict[key] = flag.expand(len(self.names)).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _call_term(self, name, given):
        if isinstance(given, torch.Tensor):
            return given
        fn = self.terms[name] if name in self.terms else self._functions[name]
        if fn is None:
            raise TypeError(f"{name}: this term has no callable, pass its value as a tensor")
        if isinstance(given, Mapping):
            return fn(**given)
        if isinstance(given, (tuple, list)):
            return fn(*given)
        raise TypeError(f"{name}: expected a tuple of arguments, a dict of keyword arguments or "
                        f"a tensor, got {type(given).__name__}")

    def forward(self, **inputs):
        missing = [k for k in self.names if k not in inputs]
        unknown = [k for k in inputs if k not in self.weights]
        if missing or unknown:
            raise ValueError(f"expected inputs for exactly the terms {self.names}; "
                             f"missing {missing}, unknown {unknown}")
        values = {}
        for name in self.names:
            v = self._call_term(name, inputs[name])
            if not isinstance(v, torch.Tensor) or v.dim() != 0:
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"{name}: expected a scalar tensor, got {shape}")
            values[name] = v
        weights = self._effective(values)
        total = sum(weights[k] * values[k] for k in self.names)
        logs = {k: v.detach() for k, v in values.items()}
        logs["total"] = total.detach()
        return total, logs

    def _effective(self, values):
        if self.rebalance == "none":
            return self.weights
        current = torch.stack([values[k].detach().float().abs() for k in self.names])
        if self.magnitudes.device != current.device:
            self.magnitudes = self.magnitudes.to(current.device)
            self.initialised = self.initialised.to(current.device)
            self.weight_vector = self.weight_vector.to(current.device)
        finite = torch.isfinite(current)
        if self.training:  # a non-finite value skips its term's update
            ema = self.momentum * self.magnitudes + (1.0 - self.momentum) * current
            update = torch.where(self.initialised, ema, current)
            self.magnitudes = torch.where(finite, update, self.magnitudes)
            self.initialised = self.initialised | finite
        m = torch.where(self.initialised, self.magnitudes, current)
        return dict(zip(self.names, self._weights_at(m).unbind()))

    def _weights_at(self, magnitudes):
        """e_k = s_k * (sum_j w_j m_j) / m_k; a magnitude that is not finite counts as 1."""
        m = torch.where(torch.isfinite(magnitudes), magnitudes, 1.0).clamp_min(self.eps)
        w = self.weight_vector.to(m.dtype)
        return (w / w.sum()) * (w * m).sum() / m

    @property
    def effective_weights(self) -> dict:
        """The weights the next call would use if no magnitude changed (a dict of floats;
        reading it synchronises). Equal to ``weights`` without rebalancing or before the
        first finite value; a term with no finite magnitude yet counts as magnitude 1."""
        if self.rebalance == "none" or not bool(self.initialised.any()):
            return dict(self.weights)
        m = torch.where(self.initialised, self.magnitudes, float("nan"))
        effective = self._weights_at(m)
        return {k: float(effective[i]) for i, k in enumerate(self.names)}

    def extra_repr(self) -> str:
        extra = f", momentum={self.momentum}" if self.rebalance != "none" else ""
        return f"weights={self.weights}, rebalance={self.rebalance!r}{extra}"

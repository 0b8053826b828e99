"""nn.Module wrappers: each holds the hyper-parameters of one loss and calls its function."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pydistill import _validation as check
from pydistill import functional as F
from pydistill.reference.softmax_divergence import config_fields
from pydistill.reference.topk_divergence import TAILS
from pydistill.reference.representation import AT_MODES

__all__ = ["KDLoss", "LinearKDLoss", "TopKKDLoss", "AttentionTransferLoss", "HintLoss", "HintRegressor",
           "RKDLoss", "AttentionKDLoss", "RelationKDLoss", "ULDLoss", "LinearULDLoss"]


def transform_kwargs(cfg) -> dict:
    """The per-model logit transforms of a config, as keyword arguments of the functions."""
    return dict(student_logit_scale=cfg.student_logit_scale,
                teacher_logit_scale=cfg.teacher_logit_scale,
                student_softcap=cfg.student_softcap, teacher_softcap=cfg.teacher_softcap)


def _transform_repr(cfg) -> str:
    defaults = dict(student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None,
                    teacher_softcap=None)
    return "".join(f"{k}={v}, " for k, v in transform_kwargs(cfg).items() if v != defaults[k])


class KDLoss(nn.Module):
    """Module form of :func:`pydistill.kd_loss`; the arguments are the same and are
    validated at construction. ``forward(student_logits, teacher_logits, labels=None)``."""

    def __init__(
        self,
        *,
        divergence: str = "kl",
        temperature: float = 1.0,
        beta: float = 0.5,
        ignore_index: int = -100,
        hard_weight: float = 0.0,
        soft_weight: float = 1.0,
        t2: bool = True,
        softcap: Optional[float] = None,
        student_logit_scale: float = 1.0,
        teacher_logit_scale: float = 1.0,
        student_softcap: Optional[float] = None,
        teacher_softcap: Optional[float] = None,
        reduction: str = "mean",
        backend: str = "auto",
    ):
        super().__init__()
        self.cfg = F.kd_config(
            divergence=divergence, temperature=temperature, beta=beta,
            ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight,
            t2=t2, softcap=softcap, student_logit_scale=student_logit_scale,
            teacher_logit_scale=teacher_logit_scale, student_softcap=student_softcap,
            teacher_softcap=teacher_softcap, reduction=reduction,
        )
        if not isinstance(backend, str):
            raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
        self.backend = backend

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        c = self.cfg
        return F.kd_loss(
            student_logits, teacher_logits, divergence=c.divergence, temperature=c.temperature,
            beta=c.beta, labels=labels, ignore_index=c.ignore_index, hard_weight=c.hard_weight,
            soft_weight=c.soft_weight, t2=c.t2, reduction=c.reduction, backend=self.backend,
            **transform_kwargs(c),
        )

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"divergence={c.divergence!r}, temperature={c.temperature}, beta={c.beta}, "
            f"hard_weight={c.hard_weight}, soft_weight={c.soft_weight}, t2={c.t2}, "
            f"{_transform_repr(c)}reduction={c.reduction!r}, backend={self.backend!r}"
        )


class TopKKDLoss(KDLoss):
    """Module form of :func:`pydistill.topk_kd_loss` (an offline top-k teacher): ``kd_loss``'s
    hyper-parameters plus ``tail`` and ``teacher_temperature``, validated at construction.
    ``forward(student_logits, teacher_topk_logprobs, teacher_topk_indices, labels=None)``."""

    def __init__(self, *, tail: str = "bucket", teacher_temperature: Optional[float] = None,
                 backend: str = "auto", **kd_kwargs):
        for name in ("teacher_logit_scale", "teacher_softcap"):
            if kd_kwargs.get(name, 1.0 if name == "teacher_logit_scale" else None) not in (1.0, None):
                raise ValueError(f"{name}: a top-k teacher arrives as log-probs and takes no logit "
                                 f"transform, got {name}={kd_kwargs[name]}")
        super().__init__(backend=backend, **kd_kwargs)
        self.cfg = F.topk_config(tail=tail, teacher_temperature=teacher_temperature, **kd_kwargs)

    def forward(self, student_logits: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                teacher_topk_indices: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        c = self.cfg
        fields = {f: v for f, v in config_fields(c).items()
                  if f not in ("teacher_logit_scale", "teacher_softcap")}
        return F.topk_kd_loss(
            student_logits, teacher_topk_logprobs, teacher_topk_indices,
            labels=labels, backend=self.backend, **fields,
        )

    def extra_repr(self) -> str:
        c = self.cfg
        return f"tail={c.tail!r}, teacher_temperature={c.teacher_temperature}, {super().extra_repr()}"


class LinearKDLoss(KDLoss):
    """Module form of :func:`pydistill.linear_kd_loss` (the distillation loss fused with the
    student's LM head): ``kd_loss``'s hyper-parameters plus ``chunk_size``, ``process_group``,
    ``return_entropy``, ``return_components`` and the top-k teacher's ``tail`` /
    ``teacher_temperature``, validated at construction.
    ``forward(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, *,
    teacher_logits=None, teacher_topk=None, student_bias=None, teacher_bias=None, labels=None)``.
    """

    def __init__(self, *, chunk_size="auto", process_group=None, tail: str = "bucket",
                 teacher_temperature: Optional[float] = None, return_entropy: bool = False,
                 return_components: bool = False, **kd_kwargs):
        super().__init__(**kd_kwargs)
        self.return_entropy = check.boolean("return_entropy", return_entropy)
        self.return_components = check.boolean("return_components", return_components)
        self.chunk_size = check.chunk_size("chunk_size", chunk_size)
        self.process_group = check.process_group("process_group", process_group)
        self.tail = check.choice("tail", tail, TAILS)
        self.teacher_temperature = None if teacher_temperature is None else check.real(
            "teacher_temperature", teacher_temperature, low=0.0, low_open=True)

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor,
                teacher_hidden: Optional[torch.Tensor] = None,
                teacher_weight: Optional[torch.Tensor] = None, *,
                teacher_logits: Optional[torch.Tensor] = None, teacher_topk=None,
                student_bias: Optional[torch.Tensor] = None,
                teacher_bias: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        c = self.cfg
        return F.linear_kd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight,
            teacher_logits=teacher_logits, teacher_topk=teacher_topk, student_bias=student_bias,
            teacher_bias=teacher_bias, chunk_size=self.chunk_size,
            process_group=self.process_group, tail=self.tail,
            teacher_temperature=self.teacher_temperature, divergence=c.divergence,
            temperature=c.temperature, beta=c.beta, labels=labels, ignore_index=c.ignore_index,
            hard_weight=c.hard_weight, soft_weight=c.soft_weight, t2=c.t2,
            reduction=c.reduction, return_entropy=self.return_entropy,
            return_components=self.return_components, backend=self.backend,
            **transform_kwargs(c),
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size!r}"


class AttentionKDLoss(nn.Module):
    """Module form of :func:`pydistill.attention_kd_loss` (attention maps from queries and
    keys: MiniLM's ``kl``, TinyBERT's ``mse_scores``); the hyper-parameters are validated at
    construction. ``forward(student_q, student_k, teacher_q, teacher_k, attention_mask=None)``."""

    def __init__(self, *, loss: str = "kl", causal: bool = False,
                 student_scale: Optional[float] = None, teacher_scale: Optional[float] = None,
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.cfg = F.attention_config(loss=loss, causal=causal, student_scale=student_scale,
                                      teacher_scale=teacher_scale, reduction=reduction)
        if not isinstance(backend, str):
            raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
        self.backend = backend

    def forward(self, student_q: torch.Tensor, student_k: torch.Tensor, teacher_q: torch.Tensor,
                teacher_k: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        c = self.cfg
        return F.attention_kd_loss(
            student_q, student_k, teacher_q, teacher_k, loss=c.loss, attention_mask=attention_mask,
            causal=c.causal, student_scale=c.student_scale, teacher_scale=c.teacher_scale,
            reduction=c.reduction, backend=self.backend,
        )

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"loss={c.loss!r}, causal={c.causal}, student_scale={c.student_scale}, "
                f"teacher_scale={c.teacher_scale}, reduction={c.reduction!r}, backend={self.backend!r}")


class RelationKDLoss(nn.Module):
    """Module form of :func:`pydistill.relation_kd_loss` (MiniLMv2 self-attention relations);
    validated at construction. ``forward(student_x, teacher_x, attention_mask=None)``, each x a
    (B, L, W) tensor or a tuple / list of them (e.g. (Q, K, V))."""

    def __init__(self, *, num_relation_heads: int, causal: bool = False, reduction: str = "mean",
                 backend: str = "auto"):
        super().__init__()
        self.num_relation_heads = check.integer("num_relation_heads", num_relation_heads)
        if self.num_relation_heads < 1:
            raise ValueError(f"num_relation_heads: expected an int >= 1, got {self.num_relation_heads}")
        self.cfg = F.attention_config(causal=causal, reduction=reduction)
        if not isinstance(backend, str):
            raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
        self.backend = backend

    def forward(self, student_x, teacher_x, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.relation_kd_loss(
            student_x, teacher_x, num_relation_heads=self.num_relation_heads,
            attention_mask=attention_mask, causal=self.cfg.causal, reduction=self.cfg.reduction,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"num_relation_heads={self.num_relation_heads}, causal={self.cfg.causal}, "
                f"reduction={self.cfg.reduction!r}, backend={self.backend!r}")


class AttentionTransferLoss(nn.Module):
    """Module form of :func:`pydistill.attention_transfer_loss` (attention transfer between CNN
    feature maps); ``p`` and ``mode`` are validated at construction.
    ``forward(student_features, teacher_features)``: tensors, or lists of them (one per layer,
    summed)."""

    def __init__(self, *, p: float = 2, mode: str = "code"):
        super().__init__()
        self.p = check.real("p", p, low=0.0, low_open=True)
        self.mode = check.choice("mode", mode, AT_MODES)

    def forward(self, student_features, teacher_features) -> torch.Tensor:
        return F.attention_transfer_loss(student_features, teacher_features, p=self.p, mode=self.mode)

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode!r}"


class HintRegressor(nn.Linear):
    """FitNets' regressor from student to teacher channels, as one (teacher_channels,
    student_channels) weight (and bias): a 1x1 convolution over dim 1 for 4-dim (B, C, H, W)
    features, a linear map over the last dim for any other shape (B, ..., D). Initialised as
    ``nn.Linear`` (the same as a 1x1 ``nn.Conv2d``). Pass your own module to
    :func:`pydistill.hint_loss` / :class:`HintLoss` for other layouts (e.g. (B, C, L) maps) or
    a deeper regressor (FitNets used a convolution; torchdistill a 1x1 conv + BatchNorm)."""

    def __init__(self, student_channels: int, teacher_channels: int, *, bias: bool = True):
        for name, value in (("student_channels", student_channels), ("teacher_channels", teacher_channels)):
            if check.integer(name, value) < 1:
                raise ValueError(f"{name}: expected a positive int, got {value}")
        super().__init__(student_channels, teacher_channels, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        dim = 1 if features.dim() == 4 else -1
        if features.dim() < 1 or features.shape[dim] != self.in_features:
            raise ValueError(
                f"student_features: expected {self.in_features} channels in dim {dim} "
                f"(student_channels of the regressor; dim 1 for (B, C, H, W) maps, else the last), "
                f"got shape {tuple(features.shape)}")
        if dim == 1:
            return torch.nn.functional.conv2d(features, self.weight[:, :, None, None], self.bias)
        return torch.nn.functional.linear(features, self.weight, self.bias)


class HintLoss(nn.Module):
    """Module form of :func:`pydistill.hint_loss` (FitNets), owning the regressor.

    ``HintLoss()``: no regressor (student and teacher features of one shape).
    ``HintLoss(student_channels, teacher_channels)``: a trainable :class:`HintRegressor`
    (1x1 conv for (B, C, H, W), linear over the last dim otherwise), registered as the
    submodule ``regressor`` so that ``loss_fn.parameters()`` yields it: give them to the
    optimiser with the student's. ``HintLoss(regressor=module)``: your own regressor, owned
    the same way. ``forward(student_features, teacher_features)``.
    """

    def __init__(self, student_channels: Optional[int] = None, teacher_channels: Optional[int] = None,
                 *, regressor: Optional[nn.Module] = None, bias: bool = True):
        super().__init__()
        if (student_channels is None) != (teacher_channels is None):
            missing = "teacher_channels" if teacher_channels is None else "student_channels"
            raise ValueError(f"{missing}: required with the other channel count (both or neither), got None")
        if regressor is not None and student_channels is not None:
            raise ValueError("regressor: expected either a regressor or (student_channels, "
                             "teacher_channels) for the built-in one, got both")
        if regressor is not None and not callable(regressor):
            raise TypeError(f"regressor: expected a callable (an nn.Module to be trained), got "
                            f"{type(regressor).__name__}")
        if student_channels is not None:
            regressor = HintRegressor(student_channels, teacher_channels, bias=bias)
        self.regressor = regressor

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        return F.hint_loss(student_features, teacher_features, regressor=self.regressor)


class RKDLoss(nn.Module):
    """Module form of :func:`pydistill.rkd_loss` (relational KD, distance + angle); the weights
    are validated at construction. ``forward(student_embeddings, teacher_embeddings)``."""

    def __init__(self, *, distance_weight: float = 1.0, angle_weight: float = 2.0):
        super().__init__()
        self.distance_weight = check.real("distance_weight", distance_weight, low=0.0)
        self.angle_weight = check.real("angle_weight", angle_weight, low=0.0)

    def forward(self, student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor) -> torch.Tensor:
        return F.rkd_loss(student_embeddings, teacher_embeddings,
                          distance_weight=self.distance_weight, angle_weight=self.angle_weight)

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"


class ULDLoss(nn.Module):
    """Module form of :func:`pydistill.uld_loss` (Universal Logit Distillation, for teachers and
    students with different tokenizers); the arguments are validated at construction.
    ``forward(student_logits, teacher_logits, labels=None)``."""

    def __init__(self, *, temperature: float = 1.0, top_k: Optional[int] = None,
                 ignore_index: int = -100, student_logit_scale: float = 1.0,
                 teacher_logit_scale: float = 1.0, student_softcap: Optional[float] = None,
                 teacher_softcap: Optional[float] = None, reduction: str = "mean",
                 backend: str = "auto"):
        super().__init__()
        self.cfg = F.uld_config(
            temperature=temperature, top_k=top_k, ignore_index=ignore_index,
            student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
            student_softcap=student_softcap, teacher_softcap=teacher_softcap, reduction=reduction)
        if not isinstance(backend, str):
            raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
        self.backend = backend

    def _options(self) -> dict:
        return dict(backend=self.backend, **{f: getattr(self.cfg, f) for f in self.cfg.__dataclass_fields__})

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.uld_loss(student_logits, teacher_logits, labels=labels, **self._options())

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._options().items())


class LinearULDLoss(ULDLoss):
    """Module form of :func:`pydistill.linear_uld_loss` (ULD fused with the student's LM head):
    :class:`ULDLoss`'s arguments plus ``chunk_size``. ``forward(student_hidden, student_weight,
    teacher_hidden=None, teacher_weight=None, *, teacher_logits=None, student_bias=None,
    teacher_bias=None, labels=None)``."""

    def __init__(self, *, chunk_size="auto", **uld_kwargs):
        super().__init__(**uld_kwargs)
        if chunk_size == "tiled":
            raise ValueError("chunk_size: linear_uld_loss has no tiled path; expected 'auto' or "
                             "a positive int (rows per chunk), got 'tiled'")
        self.chunk_size = check.chunk_size("chunk_size", chunk_size)

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor,
                teacher_hidden: Optional[torch.Tensor] = None,
                teacher_weight: Optional[torch.Tensor] = None, *,
                teacher_logits: Optional[torch.Tensor] = None,
                student_bias: Optional[torch.Tensor] = None,
                teacher_bias: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.linear_uld_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight,
            teacher_logits=teacher_logits, student_bias=student_bias, teacher_bias=teacher_bias,
            chunk_size=self.chunk_size, labels=labels, **self._options())

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size!r}, {super().extra_repr()}"

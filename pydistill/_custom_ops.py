"""The public losses as PyTorch custom ops, so that ``torch.compile(fullgraph=True)`` traces
them as single graph nodes (and ``torch.library.opcheck`` can check them).

Registered in the ``pydistill`` namespace (``torch.library.custom_op`` adds a FRAGMENT; the
CUDA extension's ``TORCH_LIBRARY(pydistill, m)`` defines other names, kd_fwd / topk_fwd /
..., and either may load first: a TORCH_LIBRARY loaded after Python ops of its namespace, and
Python ops defined after it, both register)::

    pydistill::kd_loss            (logits pair)            -> (loss, grad_student, grad_teacher)
    pydistill::topk_kd_loss       (logits, top-k teacher)  -> (loss, grad_student)
    pydistill::linear_kd_loss     (hidden, heads, teacher) -> (loss, 7 gradients, entropy, kd, ce)
    pydistill::linear_kd_loss_backward   (grad_output, ...) -> 7 gradients
    pydistill::attention_kd_loss  (q, k of both models)    -> (loss, 4 gradients)
    pydistill::attention_kd_loss_backward (grad_output, ...) -> 4 gradients

The cuda backend's kd_loss / topk_kd_loss are such ops already (kd_fwd / topk_fwd carry
their autograd) and are called directly. Each op here runs the autograd Function of the
backend it is given (already resolved by the public
function, which also validates: both stay outside the op) with a stand-in context: its
forward, then its backward with a grad_output of ones. Every backend computes the gradients in
its forward anyway, so this costs no extra pass; the gradients come out as extra outputs (an
empty tensor where an input needs none) and the registered backward multiplies them by
grad_output. With ``reduction="none"`` that is exact for kd_loss and topk_kd_loss (each row's
gradient involves only that row: it is scaled per row); linear_kd_loss and attention_kd_loss
(whose weight / key gradients mix rows) compute no gradient in the forward and run the
``*_backward`` op, which recomputes with grad_output, as their Functions' own backward does.

Only traced code takes this route (``torch.compiler.is_compiling()``): eager calls go to the
Functions directly, keeping each backend's own gradient schedule (the Triton backend's default
recomputes the gradient in the backward; through these ops it is computed in the forward).

The options are passed as scalars (str / float / int / bool / None; the per-model logit
transforms as one list of four floats): the op schema has no room for the config dataclasses. ``linear_kd_loss`` with a ``process_group`` (a Python object)
bypasses the op and calls its Function directly (not covered under torch.compile).
"""

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from pydistill import _dispatch
from pydistill.reference.attention_kd import AttentionKDConfig
from pydistill.reference.linear_kd import ChunkPlan
from pydistill.reference.softmax_divergence import KDConfig, compute_dtype, config_fields
from pydistill.reference.topk_divergence import TopKConfig


def _direct(backend: str) -> bool:
    """Whether to call the backend's Function directly: in eager mode (the ops cost nothing
    there, and the Triton backend keeps its gradient schedule), and for the cuda backend's
    kd_loss / topk_kd_loss, whose C++ ops are custom ops already."""
    return backend == "cuda" or not (FORCE or torch.compiler.is_compiling())


# Route eager calls through the ops too (the tests compare both ways).
FORCE = False


class _Ctx:
    """Enough of an autograd context for the backends' forward / backward, called directly."""

    def __init__(self, needs_input_grad):
        self.needs_input_grad = tuple(needs_input_grad)
        self.saved_tensors = ()

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *args):
        pass

    def set_materialize_grads(self, value):
        pass


def _run(fn, needs, args, loss_shape_of_ones=True):
    """(loss, grads for a grad_output of ones, or None when no input needs one). ``loss`` is
    whatever the Function returns: the loss, or (loss, extras...) for linear_kd's components
    and entropy."""
    ctx = _Ctx(needs)
    with torch.no_grad():
        loss = fn.forward(ctx, *args)
        if not any(needs) or not loss_shape_of_ones:
            return loss, None
        grads = fn.backward(ctx, torch.ones_like(loss[0] if isinstance(loss, tuple) else loss))
    return loss, grads


def _or_empty(g: Optional[Tensor], like: Tensor) -> Tensor:
    # contiguous, as the fake implementations promise (a no-op for every backend today)
    return g.contiguous() if g is not None else like.new_empty(0)


def _none_if_empty(g: Tensor) -> Optional[Tensor]:
    """None for the empty placeholder of an input that needs no gradient."""
    return None if g.dim() == 1 and g.numel() == 0 else g


def _scaled(g: Tensor, grad_out: Tensor, rowwise: bool) -> Optional[Tensor]:
    if _none_if_empty(g) is None:
        return None
    scale = grad_out[..., None] if rowwise and grad_out.dim() else grad_out
    return g * scale.to(g.dtype)


def _transform(cfg: KDConfig) -> List[float]:
    """The per-model logit transforms as the ops carry them: [student scale, student soft-cap,
    teacher scale, teacher soft-cap], 0 for an absent soft-cap (a real one is > 0)."""
    return [float(cfg.student_logit_scale), float(cfg.student_softcap or 0.0),
            float(cfg.teacher_logit_scale), float(cfg.teacher_softcap or 0.0)]


def _transform_fields(transform) -> dict:
    a_s, c_s, a_t, c_t = transform
    return dict(student_logit_scale=a_s, student_softcap=c_s or None, teacher_logit_scale=a_t,
                teacher_softcap=c_t or None)


def _kd_cfg(divergence, temperature, beta, ignore_index, hard_weight, soft_weight, t2, transform,
            reduction) -> KDConfig:
    return KDConfig(divergence=divergence, temperature=temperature, beta=beta,
                    ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight,
                    t2=t2, reduction=reduction, **_transform_fields(transform))


def _loss_like(x: Tensor, lead, reduction: str, *dtypes) -> Tensor:
    return x.new_empty(tuple(lead) if reduction == "none" else (), dtype=compute_dtype(*dtypes))


def _grad_like(x: Optional[Tensor], need: bool) -> Tensor:
    if x is None or not need:
        return (x if x is not None else torch.empty(0)).new_empty(0)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _register_rowmixing_autograd(op, backward_op, *, reduction_at: int, lead: int, trail: int,
                                 n_grads=None):
    """Autograd of an op returning (loss, its gradients for a grad_output of ones[, extra
    non-differentiable outputs]) whose gradients mix rows (linear_kd_loss, attention_kd_loss):
    a scalar grad_output scales the saved gradients; with ``reduction="none"`` (input
    ``reduction_at``) the backward op recomputes them with the per-row grad_output. ``lead`` /
    ``trail``: how many inputs before / after the differentiable tensors get no gradient;
    ``n_grads``: how many outputs after the loss are gradients (default: all)."""
    def setup(ctx, inputs, output):
        ctx.reduction = inputs[reduction_at]
        ctx.inputs = inputs
        grads = output[1:] if n_grads is None else output[1:1 + n_grads]
        if ctx.reduction == "none":
            ctx.save_for_backward(*[x for x in inputs if isinstance(x, Tensor)])
        else:
            ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(*output[1:])

    def backward(ctx, grad_loss, *_grads):
        if ctx.reduction == "none":
            saved = iter(ctx.saved_tensors)
            inputs = [next(saved) if isinstance(x, Tensor) else x for x in ctx.inputs]
            if n_grads is not None:  # the backward op takes the inputs the gradients need
                inputs = inputs[:reduction_at + 3]
            grads = [_none_if_empty(g) for g in backward_op(grad_loss, *inputs)]
        else:
            grads = [_scaled(g, grad_loss, False) for g in ctx.saved_tensors]
        return (*([None] * lead), *grads, *([None] * trail))

    op.register_autograd(backward, setup_context=setup)


# --------------------------------------------------------------------------------------------
# kd_loss
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("pydistill::kd_loss", mutates_args=())
def kd_loss_op(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor],
               divergence: str, temperature: float, beta: float, ignore_index: int,
               hard_weight: float, soft_weight: float, t2: bool, transform: List[float],
               reduction: str, backend: str, need_student: bool,
               need_teacher: bool) -> tuple[Tensor, Tensor, Tensor]:
    cfg = _kd_cfg(divergence, temperature, beta, ignore_index, hard_weight, soft_weight, t2,
                  transform, reduction)
    fn = _dispatch.implementation("kd_loss", backend)
    loss, grads = _run(fn, (need_student, need_teacher, False, False),
                       (student_logits, teacher_logits, labels, cfg))
    grads = grads or (None, None)
    return loss, _or_empty(grads[0], student_logits), _or_empty(grads[1], teacher_logits)


@kd_loss_op.register_fake
def _(student_logits, teacher_logits, labels, divergence, temperature, beta, ignore_index,
      hard_weight, soft_weight, t2, transform, reduction, backend, need_student, need_teacher):
    return (_loss_like(student_logits, student_logits.shape[:-1], reduction,
                       student_logits.dtype, teacher_logits.dtype),
            _grad_like(student_logits, need_student), _grad_like(teacher_logits, need_teacher))


def _kd_setup(ctx, inputs, output):
    ctx.rowwise = inputs[11] == "none"
    ctx.save_for_backward(output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _kd_backward(ctx, grad_loss, _g1, _g2):
    g_s, g_t = ctx.saved_tensors
    return (_scaled(g_s, grad_loss, ctx.rowwise), _scaled(g_t, grad_loss, ctx.rowwise),
            *([None] * 13))


kd_loss_op.register_autograd(_kd_backward, setup_context=_kd_setup)


def kd_loss(student_logits, teacher_logits, labels, cfg: KDConfig, backend: str):
    if _direct(backend):
        return _dispatch.implementation("kd_loss", backend).apply(
            student_logits, teacher_logits, labels, cfg)
    grad = torch.is_grad_enabled()
    loss, _, _ = kd_loss_op(
        student_logits, teacher_logits, labels, cfg.divergence, float(cfg.temperature),
        float(cfg.beta), int(cfg.ignore_index), float(cfg.hard_weight), float(cfg.soft_weight),
        bool(cfg.t2), _transform(cfg), cfg.reduction, backend,
        grad and student_logits.requires_grad, grad and teacher_logits.requires_grad,
    )
    return loss


# --------------------------------------------------------------------------------------------
# topk_kd_loss
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("pydistill::topk_kd_loss", mutates_args=())
def topk_kd_loss_op(student_logits: Tensor, topk_logprobs: Tensor, topk_indices: Tensor,
                    labels: Optional[Tensor], tail: str, teacher_temperature: Optional[float],
                    divergence: str, temperature: float, beta: float, ignore_index: int,
                    hard_weight: float, soft_weight: float, t2: bool, transform: List[float],
                    reduction: str, backend: str,
                    need_student: bool) -> tuple[Tensor, Tensor]:
    cfg = TopKConfig(divergence=divergence, temperature=temperature, beta=beta,
                     ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight,
                     t2=t2, reduction=reduction, tail=tail,
                     teacher_temperature=teacher_temperature, **_transform_fields(transform))
    fn = _dispatch.implementation("topk_kd_loss", backend)
    loss, grads = _run(fn, (need_student, False, False, False, False),
                       (student_logits, topk_logprobs, topk_indices, labels, cfg))
    return loss, _or_empty(grads[0] if grads else None, student_logits)


@topk_kd_loss_op.register_fake
def _(student_logits, topk_logprobs, topk_indices, labels, tail, teacher_temperature, divergence,
      temperature, beta, ignore_index, hard_weight, soft_weight, t2, transform, reduction, backend,
      need_student):
    return (_loss_like(student_logits, student_logits.shape[:-1], reduction,
                       student_logits.dtype, topk_logprobs.dtype),
            _grad_like(student_logits, need_student))


def _topk_setup(ctx, inputs, output):
    ctx.rowwise = inputs[14] == "none"
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _topk_backward(ctx, grad_loss, _g1):
    (g_s,) = ctx.saved_tensors
    return (_scaled(g_s, grad_loss, ctx.rowwise), *([None] * 16))


topk_kd_loss_op.register_autograd(_topk_backward, setup_context=_topk_setup)


def topk_kd_loss(student_logits, topk_logprobs, topk_indices, labels, cfg: TopKConfig,
                 backend: str):
    if _direct(backend):
        return _dispatch.implementation("topk_kd_loss", backend).apply(
            student_logits, topk_logprobs, topk_indices, labels, cfg)
    loss, _ = topk_kd_loss_op(
        student_logits, topk_logprobs, topk_indices, labels, cfg.tail,
        None if cfg.teacher_temperature is None else float(cfg.teacher_temperature),
        cfg.divergence, float(cfg.temperature), float(cfg.beta), int(cfg.ignore_index),
        float(cfg.hard_weight), float(cfg.soft_weight), bool(cfg.t2), _transform(cfg),
        cfg.reduction, backend, torch.is_grad_enabled() and student_logits.requires_grad,
    )
    return loss


# --------------------------------------------------------------------------------------------
# linear_kd_loss
# --------------------------------------------------------------------------------------------

_LINEAR_TENSORS = 9  # student_hidden, student_weight, student_bias, teacher_hidden,
# teacher_weight, teacher_bias, teacher_logits, topk_logprobs, topk_indices (the Function's order)


def _linear_cfg(topk, tail, teacher_temperature, *kd):
    cfg = _kd_cfg(*kd)
    if topk:
        return TopKConfig(**config_fields(cfg), tail=tail,
                          teacher_temperature=teacher_temperature)
    return cfg


def _linear_call(labels, tensors, chunk_size, tail, teacher_temperature, kd, backend, needs,
                 entropy=False, components=False):
    """What both linear_kd_loss ops run: the backend's Function, its arguments, and ``needs``
    padded to every tensor of the Function."""
    cfg = _linear_cfg(tensors[7] is not None, tail, teacher_temperature, *kd)
    # chunk_size as the ops carry it: 0 "auto", -1 "tiled", else rows per chunk
    plan = ChunkPlan(chunk_size={0: "auto", -1: "tiled"}.get(chunk_size, chunk_size), group=None,
                     entropy=entropy, components=components)
    needs = [bool(n) for n in needs] + [False] * (_LINEAR_TENSORS - len(needs))
    return (_dispatch.implementation("linear_kd_loss", backend), (cfg, plan, labels, *tensors),
            needs)


@torch.library.custom_op("pydistill::linear_kd_loss", mutates_args=())
def linear_kd_loss_op(
    labels: Optional[Tensor], student_hidden: Tensor, student_weight: Tensor,
    student_bias: Optional[Tensor], teacher_hidden: Optional[Tensor],
    teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
    teacher_logits: Optional[Tensor], topk_logprobs: Optional[Tensor],
    topk_indices: Optional[Tensor], chunk_size: int, tail: str,
    teacher_temperature: Optional[float], divergence: str, temperature: float, beta: float,
    ignore_index: int, hard_weight: float, soft_weight: float, t2: bool,
    transform: List[float], reduction: str, backend: str, needs: List[bool], entropy: bool,
    components: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    fn, args, needs = _linear_call(
        labels, (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                 teacher_bias, teacher_logits, topk_logprobs, topk_indices), chunk_size, tail,
        teacher_temperature, (divergence, temperature, beta, ignore_index, hard_weight,
                              soft_weight, t2, transform, reduction), backend, needs, entropy,
        components)
    # reduction 'none': the gradients wait for grad_output (linear_kd_loss_backward)
    out, grads = _run(fn, (False, False, False, *needs), args,
                      loss_shape_of_ones=reduction != "none")
    out = out if isinstance(out, tuple) else (out,)
    loss, rest = out[0], list(out[1:])
    kd, ce = (rest.pop(0), rest.pop(0)) if components else (None, None)
    ent = rest.pop(0) if entropy else None
    grads = list(grads[3:3 + 7]) if grads is not None else [None] * 7
    return (loss, *[_or_empty(g, student_hidden) for g in grads], _or_empty(ent, student_hidden),
            _or_empty(kd, student_hidden), _or_empty(ce, student_hidden))


@linear_kd_loss_op.register_fake
def _(labels, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
      teacher_bias, teacher_logits, topk_logprobs, topk_indices, chunk_size, tail,
      teacher_temperature, divergence, temperature, beta, ignore_index, hard_weight, soft_weight,
      t2, transform, reduction, backend, needs, entropy, components=False):
    tensors = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
               teacher_bias, teacher_logits)
    dtypes = [x.dtype for x in tensors + (topk_logprobs,) if x is not None]
    loss = _loss_like(student_hidden, student_hidden.shape[:-1], reduction, *dtypes)
    grads = [_grad_like(x, reduction != "none" and i < len(needs) and bool(needs[i]))
             if x is not None else student_hidden.new_empty(0) for i, x in enumerate(tensors)]
    ent = (_loss_like(student_hidden, student_hidden.shape[:-1], "none", *dtypes) if entropy
           else student_hidden.new_empty(0))
    parts = [_loss_like(student_hidden, student_hidden.shape[:-1], reduction, *dtypes)
             if components else student_hidden.new_empty(0) for _ in range(2)]
    return (loss, *grads, ent, *parts)


@torch.library.custom_op("pydistill::linear_kd_loss_backward", mutates_args=())
def linear_kd_loss_backward_op(
    grad_loss: Tensor, labels: Optional[Tensor], student_hidden: Tensor, student_weight: Tensor,
    student_bias: Optional[Tensor], teacher_hidden: Optional[Tensor],
    teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
    teacher_logits: Optional[Tensor], topk_logprobs: Optional[Tensor],
    topk_indices: Optional[Tensor], chunk_size: int, tail: str,
    teacher_temperature: Optional[float], divergence: str, temperature: float, beta: float,
    ignore_index: int, hard_weight: float, soft_weight: float, t2: bool,
    transform: List[float], reduction: str, backend: str, needs: List[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    fn, args, needs = _linear_call(
        labels, (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                 teacher_bias, teacher_logits, topk_logprobs, topk_indices), chunk_size, tail,
        teacher_temperature, (divergence, temperature, beta, ignore_index, hard_weight,
                              soft_weight, t2, transform, reduction), backend, needs)
    ctx = _Ctx((False, False, False, *needs))
    with torch.no_grad():
        fn.forward(ctx, *args)
        grads = fn.backward(ctx, grad_loss)
    return tuple(_or_empty(g, student_hidden) for g in grads[3:3 + 7])


@linear_kd_loss_backward_op.register_fake
def _(grad_loss, labels, student_hidden, student_weight, student_bias, teacher_hidden,
      teacher_weight, teacher_bias, teacher_logits, topk_logprobs, topk_indices, *rest):
    needs = rest[-1]
    tensors = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
               teacher_bias, teacher_logits)
    return tuple(_grad_like(x, i < len(needs) and bool(needs[i]))
                 if x is not None else student_hidden.new_empty(0) for i, x in enumerate(tensors))


_register_rowmixing_autograd(linear_kd_loss_op, linear_kd_loss_backward_op, reduction_at=21,
                             lead=1, trail=18, n_grads=7)


def linear_kd_loss(cfg, plan: ChunkPlan, labels, tensors: Sequence, backend: str):
    """``tensors`` in the Function's order (student_hidden, ..., topk_indices)."""
    if _direct(backend) or plan.group is not None:
        fn = _dispatch.implementation("linear_kd_loss", backend)
        return fn.apply(cfg, plan, labels, *tensors)
    grad = torch.is_grad_enabled()
    needs = [grad and x is not None and x.requires_grad for x in tensors[:7]]
    topk = isinstance(cfg, TopKConfig)
    out = linear_kd_loss_op(
        labels, *tensors, {"auto": 0, "tiled": -1}.get(plan.chunk_size, plan.chunk_size),
        cfg.tail if topk else "bucket",
        None if not topk or cfg.teacher_temperature is None else float(cfg.teacher_temperature),
        cfg.divergence, float(cfg.temperature), float(cfg.beta), int(cfg.ignore_index),
        float(cfg.hard_weight), float(cfg.soft_weight), bool(cfg.t2), _transform(cfg),
        cfg.reduction, backend, needs, bool(plan.entropy), bool(plan.components),
    )
    extras = ([out[9], out[10]] if plan.components else []) + ([out[8]] if plan.entropy else [])
    return (out[0], *extras) if extras else out[0]


# --------------------------------------------------------------------------------------------
# attention_kd_loss (loss="kl"; "mse_scores" is plain PyTorch and traces as it is)
# --------------------------------------------------------------------------------------------


def _attention_cfg(causal, student_scale, teacher_scale, reduction):
    return AttentionKDConfig(loss="kl", causal=causal, student_scale=student_scale,
                             teacher_scale=teacher_scale, reduction=reduction)


@torch.library.custom_op("pydistill::attention_kd_loss", mutates_args=())
def attention_kd_loss_op(student_q: Tensor, student_k: Tensor, teacher_q: Tensor,
                         teacher_k: Tensor, attention_mask: Optional[Tensor], causal: bool,
                         student_scale: float, teacher_scale: float, reduction: str,
                         backend: str, needs: List[bool]
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    cfg = _attention_cfg(causal, student_scale, teacher_scale, reduction)
    fn = _dispatch.implementation("attention_kd_loss", backend)
    inputs = (student_q, student_k, teacher_q, teacher_k)
    loss, grads = _run(fn, (*[bool(n) for n in needs], False, False),
                       (*inputs, attention_mask, cfg), loss_shape_of_ones=reduction != "none")
    grads = grads or [None] * 4
    return (loss, *[_or_empty(g, x) for g, x in zip(grads[:4], inputs)])


@attention_kd_loss_op.register_fake
def _(student_q, student_k, teacher_q, teacher_k, attention_mask, causal, student_scale,
      teacher_scale, reduction, backend, needs):
    inputs = (student_q, student_k, teacher_q, teacher_k)
    loss = _loss_like(student_q, student_q.shape[:3], reduction, student_q.dtype, teacher_q.dtype)
    return (loss, *[_grad_like(x, reduction != "none" and bool(n)) for x, n in zip(inputs, needs)])


@torch.library.custom_op("pydistill::attention_kd_loss_backward", mutates_args=())
def attention_kd_loss_backward_op(grad_loss: Tensor, student_q: Tensor, student_k: Tensor,
                                  teacher_q: Tensor, teacher_k: Tensor,
                                  attention_mask: Optional[Tensor], causal: bool,
                                  student_scale: float, teacher_scale: float, reduction: str,
                                  backend: str, needs: List[bool]
                                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    cfg = _attention_cfg(causal, student_scale, teacher_scale, reduction)
    fn = _dispatch.implementation("attention_kd_loss", backend)
    inputs = (student_q, student_k, teacher_q, teacher_k)
    ctx = _Ctx((*[bool(n) for n in needs], False, False))
    with torch.no_grad():
        fn.forward(ctx, *inputs, attention_mask, cfg)
        grads = fn.backward(ctx, grad_loss)
    return tuple(_or_empty(g, x) for g, x in zip(grads[:4], inputs))


@attention_kd_loss_backward_op.register_fake
def _(grad_loss, student_q, student_k, teacher_q, teacher_k, attention_mask, causal,
      student_scale, teacher_scale, reduction, backend, needs):
    return tuple(_grad_like(x, bool(n))
                 for x, n in zip((student_q, student_k, teacher_q, teacher_k), needs))


_register_rowmixing_autograd(attention_kd_loss_op, attention_kd_loss_backward_op,
                             reduction_at=8, lead=0, trail=7)


def attention_kd_loss(student_q, student_k, teacher_q, teacher_k, attention_mask,
                      cfg: AttentionKDConfig, backend: str):
    if _direct(backend):
        return _dispatch.implementation("attention_kd_loss", backend).apply(
            student_q, student_k, teacher_q, teacher_k, attention_mask, cfg)
    grad = torch.is_grad_enabled()
    needs = [grad and x.requires_grad for x in (student_q, student_k, teacher_q, teacher_k)]
    out = attention_kd_loss_op(student_q, student_k, teacher_q, teacher_k, attention_mask,
                               bool(cfg.causal), float(cfg.student_scale),
                               float(cfg.teacher_scale), cfg.reduction, backend, needs)
    return out[0]

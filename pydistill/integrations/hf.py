"""Hugging Face Trainer integration: distillation from last hidden states and LM heads.

``causal_lm_kd_loss`` runs the student's and the teacher's backbones (``model.base_model``)
for their last hidden states and feeds them with both ``get_output_embeddings()`` weights
(and biases) to :func:`pydistill.linear_kd_loss`: the (B, T, V) logits of neither model are
ever formed. ``DistillationTrainer`` is a ``transformers.Trainer`` whose ``compute_loss`` is
that function. This module imports ``transformers``; ``pydistill.integrations`` imports it
only when ``DistillationTrainer`` is first used.

Labels are the causal-LM labels the collators produce (``labels[i, j]`` is token j of row i,
-100 for padding and prompt tokens); the hidden state at position j is scored against
``labels[:, j + 1]``, the last position against nothing.

Wrappers: the backbone and the loss run *inside* the model's own forward call (the forward is
redirected for one call), so DistributedDataParallel prepares its gradient reduction and
FSDP2 (``fully_shard``) gathers the root module's parameters, LM head included, exactly as for
an ordinary forward. The student's LM head must belong to the root FSDP module (or to no
FSDP module): a head sharded by its own ``fully_shard`` is only gathered when the head module
itself is called, which this path never does, and is refused with an error. The teacher's
head is read after its forward; if it is still sharded it is all-gathered with
``DTensor.full_tensor()`` (no gradient).

Logit transforms: heads that scale or soft-cap their logits (Cohere, Granite, Gemma-2,
Falcon-H1, ...) are distilled through the same transform, per model, read from each model's
config (:func:`logit_transform`, TRL's rule), so the loss is that of the models' own logits.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
import transformers

from pydistill import functional as pdf
from pydistill.modules import LinearKDLoss

__all__ = ["DistillationTrainer", "causal_lm_kd_loss", "logit_transform"]

# inputs a collator may add that are not backbone arguments
_NOT_MODEL_INPUTS = ("labels", "shift_labels", "num_items_in_batch", "return_loss")
# config fields of the logit scale some heads apply after the matmul, in TRL's order of
# precedence (logits_scaling, divided by, comes last: logit_transform)
_LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DistributedDataParallel / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _call_through(wrapper: torch.nn.Module, module: torch.nn.Module, fn):
    """Call ``wrapper()`` with ``module.forward`` replaced by ``fn`` for this one call, so the
    wrappers' and FSDP's forward hooks run around ``fn`` as around an ordinary forward."""
    had_own = "forward" in module.__dict__
    original = module.__dict__.get("forward")

    def restore():
        if had_own:
            module.forward = original
        elif "forward" in module.__dict__:
            del module.forward

    def forward(*_args, **_kwargs):
        restore()
        return fn()

    module.forward = forward
    try:
        return wrapper()
    finally:
        restore()


def _text_config(model_or_config):
    """The config that holds the LM head's settings: a model's ``config`` (None if it has
    none), or the config given, and on a VLM its ``get_text_config()``."""
    config = model_or_config
    if isinstance(config, torch.nn.Module):
        config = getattr(config, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def _config_transform(model_or_config):
    """((scale, the config field it came from), (soft-cap, its field)); fields None if absent."""
    config = _text_config(model_or_config)
    for name in _LOGIT_SCALES:
        scale = getattr(config, name, None)
        if scale is not None:
            break
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scaling = config.logits_scaling
        name = "logits_scaling"
        scale = scaling if getattr(config, "model_type", None) == "hyperclovax" else 1 / scaling
    cap = getattr(config, "final_logit_softcapping", None)
    return ((1.0, None) if scale is None else (float(scale), name),
            (None, None) if cap is None else (float(cap), "final_logit_softcapping"))


def logit_transform(model_or_config) -> Tuple[float, Optional[float]]:
    """``(logit_scale, softcap)``: the transform a causal LM's head applies to its logits
    ``h W^T + b``, ``z = softcap * tanh(logit_scale * logits / softcap)`` (no tanh when the
    soft-cap is None), read from the model's (text) config as TRL 1.16's
    ``DistillationTrainer`` reads it (``get_text_config()``, so a VLM's text config).

    The scale is the first of these fields that is not None: ``logit_scale`` (Cohere),
    ``output_multiplier`` (Muse Glimmer), ``lm_head_multiplier`` (Falcon-H1), then
    ``logits_scaling``, which Granite and MiniCPM3 divide by (scale = 1 / logits_scaling) and
    HyperCLOVA X (``model_type == "hyperclovax"``) multiplies by; none of them: 1.0. The
    soft-cap is ``final_logit_softcapping`` (Gemma-2), None when absent.
    """
    (scale, _), (cap, _) = _config_transform(model_or_config)
    return scale, cap


def _agree(role, name, from_config, field, from_loss, identity):
    """One side's setting: the config's, or the loss's where the config has none (identity);
    two different non-identity values are an error."""
    if from_loss is None or from_loss == identity:
        return from_config
    if from_config is None or from_config == identity:
        return from_loss
    if math.isclose(from_config, from_loss, rel_tol=1e-9):
        return from_config
    raise ValueError(
        f"{role}_{name}: the loss says {from_loss}, the {role}'s config {from_config} (from its "
        f"{field}, the transform its own head applies); leave it unset on the loss to use the "
        f"config's, or call pydistill.linear_kd_loss directly for another transform")


def head_transforms(student, teacher, loss: LinearKDLoss) -> dict:
    """linear_kd_loss's per-model transform arguments for this pair: each model's
    :func:`logit_transform`, where the loss sets none for that model (scale 1, no soft-cap) or
    the same; the loss's own where the model's config declares none."""
    c = loss.cfg
    out = {}
    for role, model in (("student", student), ("teacher", teacher)):
        (scale, scale_field), (cap, cap_field) = _config_transform(model)
        out[f"{role}_logit_scale"] = _agree(role, "logit_scale", scale, scale_field,
                                            getattr(c, f"{role}_logit_scale"), 1.0)
        out[f"{role}_softcap"] = _agree(role, "softcap", cap, cap_field,
                                        getattr(c, f"{role}_softcap"), None)
    return out


def _last_hidden(model, model_inputs):
    out = model.base_model(**model_inputs, use_cache=False)
    return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state


def _head(model):
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__}: get_output_embeddings() is None; an LM head "
                         f"(a Linear from hidden states to the vocabulary) is required")
    return head.weight, getattr(head, "bias", None)


def _is_dtensor(x) -> bool:
    dtensor = getattr(getattr(torch.distributed, "tensor", None), "DTensor", None)
    return dtensor is not None and isinstance(x, dtensor)


def as_linear_kd_loss(loss) -> LinearKDLoss:
    """A ``LinearKDLoss`` from None (the defaults), a dict of its arguments, or itself."""
    if loss is None:
        return LinearKDLoss()
    if isinstance(loss, Mapping):
        return LinearKDLoss(**loss)
    if isinstance(loss, LinearKDLoss):
        return loss
    raise TypeError(f"loss: expected a pydistill.LinearKDLoss, a dict of its arguments or None, "
                    f"got {type(loss).__name__}")


def _fused_loss(loss: LinearKDLoss, h_s, w_s, b_s, h_t, w_t, b_t, labels, transforms,
                num_items_in_batch):
    # traced by torch.compile: linear_kd_loss is a custom op (pydistill/_custom_ops.py)
    c = loss.cfg
    out = pdf.linear_kd_loss(
        h_s, w_s, h_t, w_t, student_bias=b_s, teacher_bias=b_t, chunk_size=loss.chunk_size,
        divergence=c.divergence, temperature=c.temperature, beta=c.beta, labels=labels,
        ignore_index=c.ignore_index, hard_weight=c.hard_weight, soft_weight=c.soft_weight,
        t2=c.t2, **transforms,
        reduction=c.reduction if num_items_in_batch is None else "sum", backend=loss.backend,
    )
    if num_items_in_batch is None:
        return out
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(out.device)
    return out / num_items_in_batch


def causal_lm_kd_loss(student: torch.nn.Module, teacher: torch.nn.Module,
                      inputs: Mapping[str, torch.Tensor], loss=None, *,
                      num_items_in_batch=None) -> torch.Tensor:
    r"""Distillation loss of a causal LM from its teacher, fused with both LM heads.

    Per scored position (label != ``ignore_index`` after the causal shift)::

        loss_i = hard_weight * CE(z_s,i, y_{i+1}) + soft_weight * T^2 * D(p_i, q_i)
        z_s,i = cap_s(a_s (h_s,i W_s^T + b_s)),   z_t,i = cap_t(a_t (h_t,i W_t^T + b_t))
        p_i = softmax(z_t,i / T),   q_i = softmax(z_s,i / T)

    (``t2``, divergence, temperature... from ``loss``), computed by
    :func:`pydistill.linear_kd_loss` on the backbones' last hidden states: no (B, T, V)
    logits are formed. The teacher runs under ``torch.no_grad`` in eval mode.

    Each model's transform (logit scale a, soft-cap cap(x) = c tanh(x / c)) is the one its
    own head applies, so z equals the model's ``forward(...).logits``: :func:`logit_transform`
    reads it from the model's (text) config as TRL's ``DistillationTrainer`` does (Cohere's
    ``logit_scale``, Granite's ``1 / logits_scaling``, Gemma-2's ``final_logit_softcapping``,
    ...). Student and teacher may differ (a Gemma-2 teacher into a Llama student). The
    loss's own ``student_logit_scale`` / ``teacher_logit_scale`` / ``student_softcap`` /
    ``teacher_softcap`` (or ``softcap``, both) may repeat the config's value; where a config
    declares none (scale 1, no cap) the loss's is applied (a head that transforms without a
    config field); a loss value that differs from a config's is a ``ValueError``.

    Args:
        student: the student causal LM (a ``PreTrainedModel`` with ``base_model`` and
            ``get_output_embeddings()``), possibly wrapped in DistributedDataParallel or
            ``torch.compile``, or an FSDP2 (``fully_shard``) module.
        teacher: the teacher, likewise; its vocabulary may be padded to another size.
        inputs: the batch: ``input_ids``, ``labels`` (default: ``input_ids`` with positions
            where ``attention_mask`` is 0 set to -100), ``attention_mask`` and any other
            backbone arguments (``position_ids``...), passed to both backbones.
        loss: a :class:`pydistill.LinearKDLoss` (or a dict of its arguments; default
            ``LinearKDLoss()``: forward KL, T = 1, no hard term). Its logit transforms
            combine with the models' as said above.
        num_items_in_batch: None: ``loss``'s own reduction over this batch (``mean``: over
            its scored positions). Given (an int or a tensor): the sum over this batch's
            scored positions divided by it, which is how a loss stays exact under gradient
            accumulation (pass the number of scored positions in the whole accumulated batch).

    Returns:
        The scalar loss (float32).
    """
    loss = as_linear_kd_loss(loss)
    inputs = dict(inputs)
    labels = inputs.get("labels")
    input_ids = inputs.get("input_ids")
    if labels is None:
        if input_ids is None:
            raise ValueError("inputs: expected 'labels' or 'input_ids', got neither")
        labels = input_ids
        if inputs.get("attention_mask") is not None:
            labels = labels.masked_fill(inputs["attention_mask"] == 0, loss.cfg.ignore_index)
    # the hidden state at position j predicts token j + 1; the last position predicts nothing
    targets = F.pad(labels[..., 1:], (0, 1), value=loss.cfg.ignore_index)
    model_inputs = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}

    student_module, teacher_module = unwrap_model(student), unwrap_model(teacher)
    transforms = head_transforms(student_module, teacher_module, loss)
    teacher_module.eval()
    with torch.no_grad():
        h_t = _call_through(teacher, teacher_module, lambda: _last_hidden(teacher_module, model_inputs))
        w_t, b_t = _head(teacher_module)
        if _is_dtensor(w_t):
            w_t = w_t.full_tensor()
        if _is_dtensor(b_t):
            b_t = b_t.full_tensor()

    def student_forward():
        h_s = _last_hidden(student_module, model_inputs)
        w_s, b_s = _head(student_module)
        if _is_dtensor(w_s):
            raise ValueError(
                "student: its LM head weight is a sharded DTensor inside the model's forward: "
                "the head was given its own fully_shard; shard it with the root module instead "
                "(fully_shard the decoder layers, then the whole model)")
        return _fused_loss(loss, h_s, w_s, b_s, h_t.to(h_s.device), w_t, b_t,
                           targets.to(h_s.device), transforms, num_items_in_batch)

    return _call_through(student, student_module, student_forward)


class DistillationTrainer(transformers.Trainer):
    r"""``transformers.Trainer`` that distils ``teacher_model`` into ``model`` with
    :func:`causal_lm_kd_loss` (fused LM heads, no logits), mixed with the hard-label loss::

        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=TrainingArguments(...),
            distillation_loss=pdl.LinearKDLoss(temperature=2.0, hard_weight=0.5, soft_weight=0.5),
            train_dataset=train, data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
        trainer.train()

    ``distillation_loss``: a :class:`pydistill.LinearKDLoss` or a dict of its arguments
    (default: forward KL at T = 1 only). Its ``hard_weight`` mixes in the cross-entropy with the
    shifted labels (-100 ignored) in the same fused pass.

    Normalisation (gradient accumulation): the loss of a micro-batch is the sum of its
    per-token losses divided by ``num_items_in_batch``, the number of scored tokens
    (labels[..., 1:] != -100) of the whole accumulated batch that Trainer counts before the
    accumulation steps, summed over processes when ``average_tokens_across_devices`` is on
    (then multiplied by the number of processes, as Trainer does, to undo DDP's gradient
    averaging). So k accumulation steps of micro-batches give the gradient of one step on their
    union, a token-level mean — the normalisation of Hugging Face's own causal-LM loss and of
    TRL's GKD / distillation trainers. To get the count, the trainer sets
    ``model_accepts_loss_kwargs = True`` after ``Trainer.__init__`` (Trainer then computes the
    count, and does not divide the loss by the accumulation steps again). Without a count
    (evaluation in older transformers), the loss is ``distillation_loss``'s own reduction of the
    batch.

    The teacher is put in eval mode with ``requires_grad_(False)``, moved to the training
    device (or prepared by accelerate for evaluation under FSDP / DeepSpeed), and run under
    ``torch.no_grad``. Evaluation (``trainer.evaluate()``) reports the same loss.
    """

    def __init__(self, model=None, args=None, *, teacher_model=None, distillation_loss=None,
                 **kwargs):
        if teacher_model is None:
            raise ValueError("teacher_model: required (the model to distil from), got None")
        super().__init__(model=model, args=args, **kwargs)
        self.distillation_loss = as_linear_kd_loss(distillation_loss)
        # Trainer counts num_items_in_batch over labels[..., 1:] only for models it believes
        # take loss kwargs and shift labels; this loss does both.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        teacher_model.eval()
        teacher_model.requires_grad_(False)
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
            teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        else:
            teacher_model = teacher_model.to(self.args.device)
        self.teacher_model = teacher_model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = causal_lm_kd_loss(model, self.teacher_model, inputs, self.distillation_loss,
                                 num_items_in_batch=num_items_in_batch)
        if num_items_in_batch is not None and getattr(self.args, "average_tokens_across_devices", False):
            tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            loss = loss * max(self.accelerator.num_processes // max(tp, 1), 1)
        return (loss, {}) if return_outputs else loss

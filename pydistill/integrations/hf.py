"""Hugging Face Trainer integration: distillation from last hidden states and LM heads.

``causal_lm_kd_loss`` runs the student's and the teacher's backbones (``model.base_model``)
for their last hidden states and feeds them with both ``get_output_embeddings()`` weights
(and biases) to :func:`pydistill.linear_kd_loss`: the (B, T, V) logits of neither model are
ever formed. ``DistillationTrainer`` is a ``transformers.Trainer`` whose ``compute_loss`` is
that function. This module imports ``transformers``; ``pydistill.integrations`` imports it
only when ``DistillationTrainer`` is first used.

Labels are the causal-LM labels the collators produce (``labels[i, j]`` is token j of row i,
-100 for padding and prompt tokens); the hidden state at position j is scored against
``labels[:, j + 1]``, the last position against nothing; or, when the batch has
``shift_labels`` (already shifted: padding-free collators, context parallelism), against
``shift_labels[:, j]`` (:func:`causal_lm_targets`).

Wrappers: the backbone and the loss run *inside* the model's own forward call
(:func:`pydistill.integrations.call_in_forward`), so DistributedDataParallel prepares its
gradient reduction, FSDP2 (``fully_shard``) gathers the root module's parameters, and
accelerate's mixed precision (``TrainingArguments(bf16=True)`` / ``fp16=True``) runs the
backbone under its autocast, exactly as for an ordinary forward. A student head sharded by
its own ``fully_shard`` stays sharded (only its own forward would gather it): it is
all-gathered with its gradient reduce-scattered as an average, FSDP2's reduction. The
teacher's head is all-gathered without gradient.

Mixed precision: under autocast each model's head runs in the autocast dtype (its hidden
states, weight and bias cast to it, as autocast casts a plain ``lm_head``), the logits GEMMs
accumulate in float32 and the loss is float32 (autocast is off inside the loss).

PEFT: student and teacher may be ``peft.PeftModel`` s. The backbone runs with its adapters;
the LM head is read as its own forward computes it: LoRA on ``lm_head`` as
``h W^T + b + sum_a s_a B_a A_a(dropout_a(h))`` (each adapter one more block of the hidden
dimension, so every adapter gets its gradient and the dropout is its own; the backward then
forms the gradient of the whole concatenated (V, H + r) weight, the frozen base rows included:
the cost of a trainable head), ``modules_to_save`` as the active adapter's copy. LoRA variants
(DoRA...) on the head are refused.

Vocabularies: the teacher's head may be padded beyond the student's (the same tokenizer, the
head rounded up: Qwen2.5-7B's 152064 rows against 0.5B's 151936). The teacher is then
restricted to the student's vocabulary, its softmax renormalised over the first V_s tokens
(the padding rows are tokens no id reaches). A teacher head shorter than the student's is
-inf beyond its end (:func:`pydistill.linear_kd_loss`'s convention: forward KL is finite,
reverse KL is not). Sizes further apart than padding (:func:`vocabulary_padding_limit`), and
two tokenizers with different vocabularies given to :class:`DistillationTrainer`, are
different tokenizers: a ``ValueError`` that points to :func:`pydistill.uld_loss`.

Logit transforms: heads that scale or soft-cap their logits (Cohere, Granite, Gemma-2,
Falcon-H1, ...) are distilled through the same transform, per model, read from each model's
config (:func:`logit_transform`, TRL's rule), so the loss is that of the models' own logits.
"""
from __future__ import annotations

import math
import warnings
from typing import Mapping, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
import transformers
from transformers.trainer_pt_utils import nested_gather

from pydistill import functional as pdf
from pydistill.integrations.distributed import (_is_peft_model, call_in_forward,
                                                gather_head_parameter, unwrap_model)
from pydistill.integrations.trl import _autocast_off, _compute_dtype
from pydistill.modules import LinearKDLoss

__all__ = ["DistillationTrainer", "causal_lm_kd_loss", "causal_lm_offline_kd_loss", "logit_transform"]

# inputs a collator may add that are not backbone arguments
_NOT_MODEL_INPUTS = ("labels", "shift_labels", "num_items_in_batch", "return_loss")
# a stored teacher's keys (pydistill.offline's collator): read by the loss, never by a model
_STORED_TEACHER = ("teacher_ids", "teacher_logprobs", "teacher_counts", "teacher_log_weights",
                   "teacher_temperature", "teacher_method",
                   # the compact form (open_store(compact=True)), decoded on the device
                   "teacher_ids_packed", "teacher_codes", "teacher_id_bits", "teacher_k",
                   "teacher_samples")
# config fields of the logit scale some heads apply after the matmul, in TRL's order of
# precedence (logits_scaling, divided by, comes last: logit_transform)
_LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier")
_NONFINITE = ("raise", "skip")


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


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model that holds the backbone and the LM head: under the DDP /
    ``torch.compile`` wrappers, and under a PEFT model (its base model, adapters injected)."""
    model = unwrap_model(model)
    return model.get_base_model() if _is_peft_model(model) else model


class _Head(NamedTuple):
    """An LM head as ``linear_kd_loss`` reads it: logits = h W^T + b + sum_a s_a B_a A_a(drop_a(h))
    (the LoRA adapters a active on it; none for a plain Linear)."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    adapters: tuple  # (lora_A, lora_B, dropout, scaling) per active LoRA adapter


def _head(model, role) -> _Head:
    """The effective LM head of a transformers model whose head may be a PEFT layer: LoRA (base
    weight + active adapters, as ``peft.tuners.lora.Linear.forward``), ``modules_to_save`` (the
    active adapter's copy), or a plain Linear."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{role}: {type(model).__name__}.get_output_embeddings() is None; an LM "
                         f"head (a Linear from hidden states to the vocabulary) is required")
    # peft.utils.other.ModulesToSaveWrapper: forwards to the active adapter's trained copy
    while hasattr(head, "modules_to_save") and hasattr(head, "original_module"):
        active = list(head.active_adapters)
        if head.disable_adapters or not active or active[0] not in head.modules_to_save:
            head = head.original_module
        else:
            head = head.modules_to_save[active[0]]
    adapters = []
    if hasattr(head, "lora_A") and hasattr(head, "base_layer"):  # peft.tuners.lora.Linear
        if head.disable_adapters and head.merged:
            head.unmerge()  # what its own forward does first
        if not head.disable_adapters and not head.merged:
            for name in head.active_adapters:
                if name not in head.lora_A:
                    continue
                variant = getattr(head, "lora_variant", {}).get(name)
                if variant is not None:
                    raise ValueError(
                        f"{role}: the LM head's LoRA adapter {name!r} is a "
                        f"{type(variant).__name__} (DoRA or another LoRA variant), whose output "
                        f"is not a weight product pydistill can fuse; put the variant on other "
                        f"modules and plain LoRA on lm_head")
                adapters.append((head.lora_A[name], head.lora_B[name], head.lora_dropout[name],
                                 head.scaling[name]))
        head = head.base_layer
    if not isinstance(head, torch.nn.Linear) and type(head).__module__.startswith("peft."):
        raise TypeError(f"{role}: the LM head is a {type(head).__name__} (a PEFT layer); pydistill "
                        f"reads LoRA (lora.Linear), modules_to_save and plain Linear heads")
    return _Head(head.weight, getattr(head, "bias", None), tuple(adapters))


def _head_inputs(head: _Head, hidden, dtype, rows=None):
    """(hidden, weight, bias) for linear_kd_loss, in ``dtype``, whose product is the head's
    logits: each LoRA adapter is one more block of the hidden dimension,
    [h, s A(drop(h))] @ [W, B]^T = h W^T + s B A drop(h), so the adapters' gradients flow
    through the fused loss (and dropout is the adapter's own). ``rows``: keep only the first
    ``rows`` rows of the vocabulary."""
    weight, bias = gather_head_parameter(head.weight), gather_head_parameter(head.bias)
    hs, ws = [hidden.to(dtype)], [weight.to(dtype)]
    bias = None if bias is None else bias.to(dtype)
    for lora_A, lora_B, dropout, scaling in head.adapters:
        a = lora_A(dropout(hidden.to(lora_A.weight.dtype)))
        hs.append((a * scaling).to(dtype))
        ws.append(lora_B.weight.to(dtype))
        if lora_B.bias is not None:
            extra = (scaling * lora_B.bias).to(dtype)
            bias = extra if bias is None else bias + extra
    hidden = hs[0] if len(hs) == 1 else torch.cat(hs, -1)
    weight = ws[0] if len(ws) == 1 else torch.cat(ws, -1)
    if rows is not None and weight.shape[0] > rows:
        weight, bias = weight[:rows], None if bias is None else bias[:rows]
    return hidden, weight, bias


def vocabulary_padding_limit(student_vocab: int, teacher_vocab: int) -> int:
    """The largest difference of two LM heads' vocabulary sizes that is read as padding of one
    tokenizer's vocabulary (rows no token id reaches, added to round the size up): 1% of the
    larger size, and at least 128. Qwen2.5-0.5B / 7B (151936 / 152064) and Phi-3's 32064 with a
    32000 student are padding; Llama-3 (128256) and Qwen (151936), or Llama-2 (32000) and
    Mistral v0.3 (32768), differ by more: different tokenizers."""
    return max(128, -(-max(student_vocab, teacher_vocab) // 100))


def check_vocabularies(student_vocab: int, teacher_vocab: int) -> None:
    """ValueError unless the two heads' vocabularies can be those of one tokenizer (their sizes
    differ by at most :func:`vocabulary_padding_limit`)."""
    limit = vocabulary_padding_limit(student_vocab, teacher_vocab)
    if abs(student_vocab - teacher_vocab) > limit:
        raise ValueError(
            f"teacher: its LM head has {teacher_vocab} rows, the student's {student_vocab}: more "
            f"than padding apart (at most {limit} rows), so the two models have different "
            f"tokenizers and token ids of one do not name the same tokens in the other. "
            f"Distil across tokenizers with pydistill.uld_loss / pydistill.linear_uld_loss "
            f"(Universal Logit Distillation)")


def _same_tokenizer(student_tokenizer, teacher_tokenizer) -> None:
    """ValueError unless the two tokenizers map the same strings to the same ids."""
    def vocab(tok):
        tok = getattr(tok, "tokenizer", tok)  # a processor: its tokenizer
        return tok.get_vocab() if hasattr(tok, "get_vocab") else None

    s, t = vocab(student_tokenizer), vocab(teacher_tokenizer)
    if s is None or t is None or s == t:
        return
    differ = sorted(set(s.items()) ^ set(t.items()), key=str)[:3]
    raise ValueError(
        f"teacher_processing_class: its vocabulary differs from the student's processing_class "
        f"({len(t)} and {len(s)} tokens; e.g. {differ}): the models have different tokenizers, so "
        f"their logits cannot be compared token id by token id. Distil across tokenizers with "
        f"pydistill.uld_loss / pydistill.linear_uld_loss (Universal Logit Distillation)")


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
                num_items_in_batch, return_components=False):
    # traced by torch.compile: linear_kd_loss is a custom op (pydistill/_custom_ops.py). Autocast
    # is off: the inputs are already in the dtype it gave the head, and the loss accumulates the
    # logits GEMMs and computes the softmaxes in float32 itself.
    c = loss.cfg
    with _autocast_off(h_s.device):
        out = pdf.linear_kd_loss(
            h_s, w_s, h_t, w_t, student_bias=b_s, teacher_bias=b_t, chunk_size=loss.chunk_size,
            divergence=c.divergence, temperature=c.temperature, beta=c.beta, labels=labels,
            ignore_index=c.ignore_index, hard_weight=c.hard_weight, soft_weight=c.soft_weight,
            t2=c.t2, **transforms,
            reduction=c.reduction if num_items_in_batch is None else "sum", backend=loss.backend,
            return_components=return_components,
        )
    return _per_items(out, num_items_in_batch, return_components)


def _per_items(out, num_items_in_batch, return_components):
    """The loss (and its parts) of a "sum" reduction divided by ``num_items_in_batch``."""
    out, parts = out if return_components else (out, None)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(out.device)
        out = out / num_items_in_batch
        if parts is not None:
            parts = {k: v / num_items_in_batch for k, v in parts.items()}
    return (out, parts) if return_components else out


def causal_lm_targets(inputs: Mapping[str, torch.Tensor], ignore_index: int = -100) -> torch.Tensor:
    """The label each position's hidden state is scored against: ``inputs["shift_labels"]`` when
    the batch has them (transformers' padding-free collators and context parallelism give them
    already shifted: position j against ``shift_labels[:, j]``), else ``labels[..., 1:]`` padded
    with ``ignore_index`` at the last position, else the same from ``input_ids`` with positions
    where ``attention_mask`` is 0 set to ``ignore_index``. ``shift_labels`` wins over ``labels``,
    as in transformers' causal-LM loss."""
    shift = inputs.get("shift_labels")
    if shift is not None:
        ids = inputs.get("input_ids", inputs.get("labels"))
        if ids is not None and tuple(shift.shape) != tuple(ids.shape):
            raise ValueError(f"inputs['shift_labels']: expected shape {tuple(ids.shape)} (that of "
                             f"input_ids), got {tuple(shift.shape)}")
        return shift
    labels = inputs.get("labels")
    if labels is None:
        labels = inputs.get("input_ids")
        if labels is None:
            raise ValueError("inputs: expected 'labels', 'shift_labels' or 'input_ids', got none")
        if inputs.get("attention_mask") is not None:
            labels = labels.masked_fill(inputs["attention_mask"] == 0, ignore_index)
    # the hidden state at position j predicts token j + 1; the last position predicts nothing
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def causal_lm_kd_loss(student: torch.nn.Module, teacher: torch.nn.Module,
                      inputs: Mapping[str, torch.Tensor], loss=None, *,
                      num_items_in_batch=None, return_components: bool = False):
    r"""Distillation loss of a causal LM from its teacher, fused with both LM heads.

    Per scored position (label != ``ignore_index`` after the causal shift)::

        loss_i = hard_weight * CE(z_s,i, y_{i+1}) + soft_weight * T^2 * D(p_i, q_i)
        z_s,i = cap_s(a_s (h_s,i W_s^T + b_s)),   z_t,i = cap_t(a_t (h_t,i W_t^T + b_t))
        p_i = softmax(z_t,i / T),   q_i = softmax(z_s,i / T)

    (``t2``, divergence, temperature... from ``loss``), computed by
    :func:`pydistill.linear_kd_loss` on the backbones' last hidden states: no (B, T, V)
    logits are formed. The teacher runs under ``torch.no_grad`` in eval mode. Under autocast
    (``TrainingArguments(bf16=True)``, accelerate's mixed precision, or the caller's) both
    models run as their own forward would, the loss in float32.

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
            ``get_output_embeddings()``, or a ``peft.PeftModel`` of one), possibly wrapped in
            DistributedDataParallel or ``torch.compile``, prepared by accelerate, or an FSDP2
            (``fully_shard``) module.
        teacher: the teacher, likewise; its head may be padded beyond the student's vocabulary
            (it is then restricted to it, see the module docstring); a head more than padding
            apart is a ``ValueError`` (another tokenizer: :func:`pydistill.uld_loss`).
        inputs: the batch: ``input_ids``, ``labels`` (default: ``input_ids`` with positions
            where ``attention_mask`` is 0 set to -100) or ``shift_labels`` (already shifted;
            it wins over ``labels``), ``attention_mask`` and any other backbone arguments
            (``position_ids``...), passed to both backbones.
        loss: a :class:`pydistill.LinearKDLoss` (or a dict of its arguments; default
            ``LinearKDLoss()``: forward KL, T = 1, no hard term). Its logit transforms
            combine with the models' as said above.
        num_items_in_batch: None: ``loss``'s own reduction over this batch (``mean``: over
            its scored positions). Given (an int or a tensor): the sum over this batch's
            scored positions divided by it, which is how a loss stays exact under gradient
            accumulation (pass the number of scored positions in the whole accumulated batch).

        return_components: also return the loss's two terms from the same fused pass, as
            ``(loss, parts)``: ``parts["kd"]`` the soft term (T^2 D, not weighted by
            ``soft_weight``) and ``parts["ce"]`` the hard cross-entropy (not weighted by
            ``hard_weight``; computed even at ``hard_weight=0``), detached, reduced and
            normalised as the loss, so ``loss == soft_weight * kd + hard_weight * ce``
            (:func:`pydistill.linear_kd_loss`'s ``return_components``).

    Returns:
        The scalar loss (float32); ``(loss, parts)`` with ``return_components``.
    """
    loss = as_linear_kd_loss(loss)
    inputs = dict(inputs)
    targets = causal_lm_targets(inputs, loss.cfg.ignore_index)
    model_inputs = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}

    student_module, teacher_module = _inner(student), _inner(teacher)
    transforms = head_transforms(student_module, teacher_module, loss)
    # (a sharded DTensor has the global shape)
    vocab = _head(student_module, "student").weight.shape[0]
    check_vocabularies(vocab, _head(teacher_module, "teacher").weight.shape[0])
    unwrap_model(teacher).eval()
    # the heads are read inside the forwards, where FSDP2 has swapped in the gathered parameters
    with torch.no_grad():
        def teacher_forward():
            h = _last_hidden(teacher_module, model_inputs)
            return _head_inputs(_head(teacher_module, "teacher"), h, _compute_dtype(h), rows=vocab)

        h_t, w_t, b_t = call_in_forward(teacher, teacher_forward)

    def student_forward():
        h_s = _last_hidden(student_module, model_inputs)
        h_s, w_s, b_s = _head_inputs(_head(student_module, "student"), h_s, _compute_dtype(h_s))
        return _fused_loss(loss, h_s, w_s, b_s, h_t.to(h_s.device), w_t.to(h_s.device),
                           None if b_t is None else b_t.to(h_s.device),
                           targets.to(h_s.device), transforms, num_items_in_batch,
                           return_components)

    return call_in_forward(student, student_forward)


def carries_stored_teacher(inputs: Mapping) -> bool:
    """Whether a batch (or a dataset item) carries a stored teacher: ``teacher_ids`` and
    ``teacher_logprobs`` (pydistill.offline's store and collator)."""
    if not isinstance(inputs, Mapping):
        return False
    return ("teacher_ids" in inputs and "teacher_logprobs" in inputs) or "teacher_ids_packed" in inputs


def causal_lm_offline_kd_loss(student: torch.nn.Module, inputs: Mapping[str, torch.Tensor],
                              loss=None, *, num_items_in_batch=None,
                              return_components: bool = False, validate: bool = False):
    r"""Distillation of a causal LM from a stored teacher that the batch carries (no teacher
    model): :func:`causal_lm_kd_loss` with the teacher's (B, L, K) ``teacher_logprobs`` /
    ``teacher_ids`` in place of its hidden states and head, through
    :func:`pydistill.linear_offline_kd_loss` (the student's fused LM head, no logits formed).

    The batch is ``pydistill.offline.OfflineCollator``'s: ``input_ids``, ``attention_mask``,
    ``labels`` (unshifted; -100 at padding), ``teacher_ids`` / ``teacher_logprobs`` (row j: the
    teacher's distribution of the token after position j, so aligned with the hidden states
    before the shift; padding rows are never read), ``teacher_temperature`` and
    ``teacher_method`` (``"topk"`` or ``"sample"``). Targets as in :func:`causal_lm_kd_loss`.

    ``loss``: a :class:`pydistill.LinearKDLoss` (or a dict of its arguments). Its temperature must
    be the stored one (nothing is re-tempered silently: another value is a ``ValueError``, as is
    a ``teacher_temperature`` that differs from it); its ``tail`` applies to a top-k store, a
    sampled store runs the unbiased estimator of :func:`pydistill.sampled_kd_loss` (forward KL
    only); the teacher's logit transforms do not apply (stored log-probs) and must be unset. The
    student's own transform is read from its config as in :func:`causal_lm_kd_loss`.
    ``num_items_in_batch``, ``return_components``: as there. ``validate``: check the stored
    values on any device (one host synchronisation; :func:`pydistill.sampled_kd_loss`).
    A compact batch (``open_store(..., compact=True)``: ``teacher_ids_packed`` and codes or
    counts) is decoded on the student's device by ``pydistill.offline.decode``.
    """
    from pydistill.ops.sampled_kd import linear_offline_kd_loss, stored_teacher

    loss = as_linear_kd_loss(loss)
    c = loss.cfg
    if c.teacher_logit_scale != 1.0 or c.teacher_softcap is not None:
        raise ValueError(
            f"distillation_loss: a stored teacher arrives as log-probs and takes no logit "
            f"transform, got teacher_logit_scale={c.teacher_logit_scale}, "
            f"teacher_softcap={c.teacher_softcap}")
    inputs = dict(inputs)
    if not carries_stored_teacher(inputs):
        raise ValueError(f"inputs: expected a stored teacher ('teacher_ids', 'teacher_logprobs', "
                         f"'teacher_temperature', 'teacher_method': pydistill.offline's collator), "
                         f"got the keys {sorted(inputs)}")
    stored, method = inputs.get("teacher_temperature"), inputs.get("teacher_method")
    if "teacher_ids_packed" not in inputs:
        _, _, stored, method = stored_teacher(inputs, c.temperature)
    if loss.teacher_temperature is not None and not math.isclose(loss.teacher_temperature, stored,
                                                                 rel_tol=1e-6):
        raise ValueError(f"distillation_loss: teacher_temperature={loss.teacher_temperature}, but "
                         f"the stored teacher was captured at {stored}")
    targets = causal_lm_targets(inputs, c.ignore_index)
    model_inputs = {k: v for k, v in inputs.items()
                    if k not in _NOT_MODEL_INPUTS and k not in _STORED_TEACHER}
    student_module = _inner(student)
    (scale, scale_field), (cap, cap_field) = _config_transform(student_module)
    transforms = dict(
        student_logit_scale=_agree("student", "logit_scale", scale, scale_field,
                                   c.student_logit_scale, 1.0),
        student_softcap=_agree("student", "softcap", cap, cap_field, c.student_softcap, None))

    def student_forward():
        h_s = _last_hidden(student_module, model_inputs)
        h_s, w_s, b_s = _head_inputs(_head(student_module, "student"), h_s, _compute_dtype(h_s))
        teacher = {k: v for k, v in inputs.items() if k in _STORED_TEACHER}
        if "teacher_ids_packed" in teacher:  # compact: only the packed bytes cross to the device
            from pydistill.offline import decode
            teacher = decode(teacher, h_s.device)
        teacher = {k: v.to(h_s.device) if isinstance(v, torch.Tensor) else v
                   for k, v in teacher.items()}
        with _autocast_off(h_s.device):
            out = linear_offline_kd_loss(
                h_s, w_s, teacher, student_bias=b_s, labels=targets.to(h_s.device),
                temperature=c.temperature, tail=loss.tail if method == "topk" else None,
                divergence=c.divergence, beta=c.beta, ignore_index=c.ignore_index,
                hard_weight=c.hard_weight, soft_weight=c.soft_weight, t2=c.t2, **transforms,
                reduction=c.reduction if num_items_in_batch is None else "sum",
                chunk_size=loss.chunk_size, return_components=return_components,
                validate=validate, backend=loss.backend)
        return _per_items(out, num_items_in_batch, return_components)

    return call_in_forward(student, student_forward)


def _dataset_carries_stored_teacher(dataset) -> Optional[bool]:
    """Whether a map-style dataset's first item carries a stored teacher (None: no dataset, an
    empty or an iterable one, which cannot be looked at without consuming it)."""
    if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset):
        return None
    try:
        if len(dataset) == 0:
            return None
        return carries_stored_teacher(dataset[0])
    except (TypeError, NotImplementedError):
        return None


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

    The teacher is put in eval mode with ``requires_grad_(False)``, prepared by accelerate for
    evaluation (placed on the device, its forward wrapped in the mixed-precision autocast, as in
    TRL's trainers) and run under ``torch.no_grad``. Evaluation (``trainer.evaluate()``) reports
    the same loss.

    Logging: beside ``loss``, each training log has ``kd_loss`` (the soft term T^2 D, not
    weighted by ``soft_weight``) and ``ce_loss`` (the hard cross-entropy with the shifted labels,
    not weighted by ``hard_weight``, computed even at ``hard_weight=0``), from the same fused pass
    (no logits formed), normalised, summed over the accumulation steps, gathered over the
    processes and averaged over the optimizer steps since the last log exactly as Trainer does
    ``loss``: ``loss == soft_weight * kd_loss + hard_weight * ce_loss``.

    Mixed precision (``bf16=True`` / ``fp16=True``): both models run under the autocast a plain
    ``Trainer`` runs its model under, the loss in float32 (see :func:`causal_lm_kd_loss`).

    ``teacher_processing_class``: the teacher's tokenizer (or processor), optional. Given with
    ``processing_class``, their vocabularies (``get_vocab()``) must be equal, else a
    ``ValueError`` points to :func:`pydistill.uld_loss` (different tokenizers); without it,
    only the heads' sizes are compared (a teacher head padded beyond the student's vocabulary
    is restricted to it; sizes further apart are refused), which cannot tell two different
    tokenizers of one size apart.

    A stored teacher (``teacher_model=None``): the batches carry the teacher instead,
    captured once by ``pydistill.offline.capture`` and read with ``open_store`` and
    ``OfflineCollator`` (``teacher_ids``, ``teacher_logprobs``, ``teacher_temperature``,
    ``teacher_method``); no teacher model is in memory::

        trainer = DistillationTrainer(
            model=student, args=TrainingArguments(...),
            distillation_loss=pdl.LinearKDLoss(temperature=store.manifest["temperature"]),
            train_dataset=store, data_collator=OfflineCollator(...))

    The loss is :func:`causal_lm_offline_kd_loss`: the same fused student head, normalisation
    and logging (``kd_loss``: for a sampled store, the unbiased estimate of the soft
    cross-entropy T^2 H(p, q), which exceeds T^2 KL by the teacher's entropy). The loss's
    temperature must be the stored one (a ``ValueError`` otherwise). The first batch's stored
    values are checked on any device (one host synchronisation: log-probs that are not
    log-probs, e.g. raw logits, or ids outside the student's vocabulary); later batches only on
    the CPU. ``teacher_model=None`` needs a dataset whose items carry the teacher (a map-style
    one's first item is looked at), and a teacher model with such batches is an error.

    ``nonfinite_loss``: what a non-finite loss does (the loss is checked once per micro-batch,
    the host synchronisation Trainer's ``logging_nan_inf_filter`` already makes): ``"raise"``
    (default) raises ``FloatingPointError``; ``"skip"`` warns (``RuntimeWarning``), gives this
    micro-batch a zero gradient for every trainable parameter (so DDP's reduction completes)
    and a loss of 0, and counts it in ``self.skipped_nonfinite``. Not with FSDP / DeepSpeed.
    Evaluation always raises. Trainer's own ``logging_nan_inf_filter`` would instead log the
    running mean in place of an infinite loss, and apply its NaN gradient.
    """

    def __init__(self, model=None, args=None, *, teacher_model=None, distillation_loss=None,
                 teacher_processing_class=None, nonfinite_loss="raise", **kwargs):
        if teacher_model is None:
            stored = [_dataset_carries_stored_teacher(kwargs.get(name))
                      for name in ("train_dataset", "eval_dataset")]
            if False in stored or (kwargs.get("train_dataset") is None
                                   and kwargs.get("eval_dataset") is None):
                raise ValueError(
                    "teacher_model: required (the model to distil from) unless the dataset's items "
                    "carry a stored teacher ('teacher_ids' and 'teacher_logprobs': "
                    "pydistill.offline.open_store), got None")
        if nonfinite_loss not in _NONFINITE:
            raise ValueError(f"nonfinite_loss: expected one of {_NONFINITE}, "
                             f"got {nonfinite_loss!r}")
        super().__init__(model=model, args=args, **kwargs)
        if nonfinite_loss == "skip" and (getattr(self, "is_fsdp_enabled", False)
                                         or getattr(self, "is_deepspeed_enabled", False)):
            raise ValueError("nonfinite_loss: 'skip' gives every parameter a zero gradient outside "
                             "the model's forward, which FSDP and DeepSpeed do not reduce; use "
                             "'raise' with them")
        if teacher_processing_class is not None and self.processing_class is not None:
            _same_tokenizer(self.processing_class, teacher_processing_class)
        self.teacher_processing_class = teacher_processing_class
        self.nonfinite_loss = nonfinite_loss
        self._component_sums, self._components_logged_at = {}, 0
        self.distillation_loss = as_linear_kd_loss(distillation_loss)
        # Trainer counts num_items_in_batch over labels[..., 1:] only for models it believes
        # take loss kwargs and shift labels; this loss does both.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self._stored_teacher_checked = False
        if teacher_model is None:  # a stored teacher, carried by the batches
            self.teacher_model = None
            return
        teacher_model.eval()
        teacher_model.requires_grad_(False)
        # as TRL's trainers: placed on the device and, with mixed precision, its forward wrapped
        # in the autocast the student's is (no DDP: it has no gradients)
        self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)

    def _set_signature_columns_if_needed(self):
        # remove_unused_columns keeps the model's forward arguments; the loss reads shift_labels
        # and a stored teacher's keys
        super()._set_signature_columns_if_needed()
        for name in ("shift_labels",) + _STORED_TEACHER:
            if name not in self._signature_columns:
                self._signature_columns.append(name)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # the autocast accelerate wraps around a prepared model's forward (the student is not
        # prepared when evaluate() runs before train())
        stored = carries_stored_teacher(inputs)
        if stored and self.teacher_model is not None:
            raise ValueError("inputs: the batch carries a stored teacher ('teacher_ids', "
                             "'teacher_logprobs') and a teacher_model was given; distil from one: "
                             "DistillationTrainer(teacher_model=None) for the stored one")
        if self.teacher_model is None and not stored:
            raise ValueError(f"inputs: DistillationTrainer(teacher_model=None) distils from a "
                             f"stored teacher the batches carry ('teacher_ids', 'teacher_logprobs'"
                             f": pydistill.offline's collator), got the keys {sorted(inputs)}")
        with self.accelerator.autocast():
            if stored:
                loss, parts = causal_lm_offline_kd_loss(
                    model, inputs, self.distillation_loss, num_items_in_batch=num_items_in_batch,
                    return_components=True, validate=not self._stored_teacher_checked)
                self._stored_teacher_checked = True
            else:
                loss, parts = causal_lm_kd_loss(model, self.teacher_model, inputs,
                                                self.distillation_loss,
                                                num_items_in_batch=num_items_in_batch,
                                                return_components=True)
        # one host synchronisation per micro-batch, as Trainer's own logging_nan_inf_filter
        if not torch.isfinite(loss.detach()).item():
            loss, parts = self._nonfinite(model, loss), None
        if num_items_in_batch is not None and getattr(self.args, "average_tokens_across_devices", False):
            tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            factor = max(self.accelerator.num_processes // max(tp, 1), 1)
            loss = loss * factor
            parts = None if parts is None else {k: v * factor for k, v in parts.items()}
        if model.training and parts is not None:
            # summed over the micro-batches as Trainer sums the loss into tr_loss
            for name, key in (("kd_loss", "kd"), ("ce_loss", "ce")):
                if key in parts:
                    total = self._component_sums.get(name)
                    value = parts[key].detach().float()
                    self._component_sums[name] = value if total is None else total + value
        return (loss, {}) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        # a training log (it has "loss"): the components' means over the same optimizer steps,
        # gathered over the processes as Trainer gathers the loss
        if "loss" in logs and self._component_sums:
            steps = max(self.state.global_step - self._components_logged_at, 1)
            for name, total in self._component_sums.items():
                logs[name] = nested_gather(total, self.args.parallel_mode).mean().item() / steps
            self._component_sums = {}
            self._components_logged_at = self.state.global_step
        return super().log(logs, *args, **kwargs)

    def _nonfinite(self, model, loss):
        where = (f"step {self.state.global_step}" if model.training else "evaluation")
        why = (f"the distillation loss is {loss.item()} at {where}: a divergence is infinite where "
               f"one model gives a token zero probability and the other does not (e.g. reverse "
               f"KL against a teacher whose vocabulary is shorter than the student's), or the "
               f"activations overflowed")
        if self.nonfinite_loss == "raise" or not model.training:
            raise FloatingPointError(f"{why}. DistillationTrainer(nonfinite_loss='skip') skips "
                                     f"such micro-batches instead")
        warnings.warn(f"{why}; this micro-batch is skipped (zero gradient), "
                      f"nonfinite_loss='skip'", RuntimeWarning, stacklevel=2)
        self.skipped_nonfinite = getattr(self, "skipped_nonfinite", 0) + 1
        # a zero reaching every trainable parameter, so that DDP's gradient reduction completes
        params = [p for p in model.parameters() if p.requires_grad]
        return sum((p.reshape(-1)[:1].float() * 0).sum() for p in params) + loss.new_zeros(())

"""pydistill.integrations: TRL's generalized_jsd_loss on kd_loss, its fused hidden-state
variant, and the Hugging Face Trainer integration on tiny models on the CPU (Llama; and, for
the per-model logit transforms, Gemma-2, Cohere, Granite, HyperCLOVA X and a Muse Glimmer VLM
against their own forward logits in float64). TRL's DistillationTrainer drop-in:
tests/test_trl_dropin.py."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import pydistill as pdl
from pydistill.integrations import generalized_jsd_loss, linear_generalized_jsd_loss

from conftest import peer


def trl_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5,
                             temperature=1.0, reduction="batchmean", num_items_in_batch=None):
    """TRL 1.16's GKDTrainer.generalized_jsd_loss, transcribed (F.kl_div(input, target) is
    target * (log target - input) per element with log_target)."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(log_q, log_p, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(log_p, log_q, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=log_q.dtype)
        log_m = torch.logsumexp(torch.stack([log_q + torch.log1p(-b), log_p + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(log_m, log_p, reduction="none", log_target=True) + (1 - b) * F.kl_div(
            log_m, log_q, reduction="none", log_target=True)
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if num_items_in_batch is not None:
        return jsd.sum() / num_items_in_batch
    if reduction == "batchmean":
        denom = mask.sum().clamp_min(1) if labels is not None else max(jsd.size(0), 1)
        return jsd.sum() / denom
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


def _logits(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(shape, generator=g)).to(dtype)


def _labels(shape, vocab, seed, masked=True):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, vocab, shape, generator=g)
    if masked:
        y[0, :3] = -100
        y[-1, -2:] = -100
    return y


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("with_labels", [False, True])
def test_generalized_jsd_loss_matches_trl(beta, reduction, with_labels):
    s = _logits((3, 7, 37), 0).requires_grad_()
    t = _logits((3, 7, 37), 1)
    labels = _labels((3, 7), 37, 2) if with_labels else None
    got = generalized_jsd_loss(s, t, labels, beta=beta, temperature=1.7, reduction=reduction)
    s_ref = s.detach().clone().requires_grad_()
    want = trl_generalized_jsd_loss(s_ref, t, labels, beta=beta, temperature=1.7, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    w = torch.rand(want.shape, generator=torch.Generator().manual_seed(3), dtype=want.dtype)
    (g,) = torch.autograd.grad(got, s, w)
    (g_ref,) = torch.autograd.grad(want, s_ref, w)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("num_items", [5, "tensor"])
def test_generalized_jsd_loss_num_items_in_batch(num_items):
    s, t, labels = _logits((2, 6, 19), 4), _logits((2, 6, 19), 5), _labels((2, 6), 19, 6)
    n = torch.tensor(11) if num_items == "tensor" else num_items
    got = generalized_jsd_loss(s, t, labels, beta=0.3, num_items_in_batch=n)
    want = trl_generalized_jsd_loss(s, t, labels, beta=0.3, num_items_in_batch=n)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_generalized_jsd_loss_float32_and_all_masked():
    s, t = _logits((2, 5, 300), 7, torch.float32), _logits((2, 5, 300), 8, torch.float32)
    labels = _labels((2, 5), 300, 9)
    torch.testing.assert_close(generalized_jsd_loss(s, t, labels),
                               trl_generalized_jsd_loss(s, t, labels), rtol=2e-5, atol=1e-6)
    none = torch.full((2, 5), -100)
    assert generalized_jsd_loss(s, t, none).item() == 0.0  # TRL: 0 / clamp_min(1)


def test_generalized_jsd_loss_equals_trl_itself():
    gkd = peer("trl.experimental.gkd.gkd_trainer")
    fn = gkd.GKDTrainer.generalized_jsd_loss
    s, t, labels = _logits((2, 6, 23), 10), _logits((2, 6, 23), 11), _labels((2, 6), 23, 12)
    for beta in (0.0, 0.5, 0.9, 1.0):
        for reduction in ("batchmean", "sum", "mean"):
            for y in (labels, None):
                torch.testing.assert_close(
                    generalized_jsd_loss(s, t, y, beta=beta, temperature=2.0, reduction=reduction),
                    fn(s, t, y, beta=beta, temperature=2.0, reduction=reduction),
                    rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("with_labels", [False, True])
def test_linear_generalized_jsd_loss_equals_logits_path(reduction, with_labels):
    g = torch.Generator().manual_seed(13)
    h_s = torch.randn(3, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w_s = (torch.randn(41, 8, generator=g, dtype=torch.float64) / 2).requires_grad_()
    h_t = torch.randn(3, 5, 12, generator=g, dtype=torch.float64)
    w_t = torch.randn(41, 12, generator=g, dtype=torch.float64) / 2
    labels = _labels((3, 5), 41, 14) if with_labels else None
    got = linear_generalized_jsd_loss(h_s, w_s, h_t, w_t, labels, beta=0.4, temperature=1.5,
                                      reduction=reduction, chunk_size=4)
    leaves = [h_s.detach().clone().requires_grad_(), w_s.detach().clone().requires_grad_()]
    want = trl_generalized_jsd_loss(leaves[0] @ leaves[1].T, h_t @ w_t.T, labels, beta=0.4,
                                    temperature=1.5, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, [h_s, w_s]), torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_gkd_validation():
    s = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="reduction"):
        generalized_jsd_loss(s, s, reduction="avg")
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd_loss(s, s, beta=1.5)
    with pytest.raises(ValueError, match="'none'"):
        linear_generalized_jsd_loss(s, torch.randn(4, 5), s, torch.randn(4, 5), reduction="none")


def test_import_does_not_need_transformers():
    code = ("import sys, pydistill, pydistill.integrations as i; "
            "assert 'transformers' not in sys.modules and 'trl' not in sys.modules; "
            "i.generalized_jsd_loss")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


# ---------------------------------------------------------------------------------------------
# Hugging Face Trainer integration

transformers = peer("transformers")


def tiny_llama(hidden, layers, vocab, seed, heads=4):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
        max_position_embeddings=64, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).float()


def batch(n, length, vocab, seed):
    """Rows of different lengths, right-padded: labels -100 and attention 0 on the padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(n):
        pad = (3 * i) % length
        if pad:
            mask[i, length - pad:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # a "prompt"
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def direct_loss(student, teacher, inputs, loss):
    """linear_kd_loss on the backbones' last hidden states, written out."""
    h_s = student.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    with torch.no_grad():
        h_t = teacher.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    y = F.pad(inputs["labels"][:, 1:], (0, 1), value=-100)
    # a padded teacher head: restricted to the student's vocabulary
    w_t = teacher.lm_head.weight[:student.lm_head.weight.shape[0]]
    return loss(h_s, student.lm_head.weight, h_t, w_t, labels=y)


LOSS = dict(temperature=2.0, hard_weight=0.4, soft_weight=0.6, divergence="jsd", beta=0.3)


def test_causal_lm_kd_loss_equals_direct_and_logits():
    from pydistill.integrations import causal_lm_kd_loss

    student, teacher = tiny_llama(32, 2, 50, 0), tiny_llama(48, 2, 56, 1)  # padded teacher vocab
    inputs = batch(4, 12, 50, 2)
    loss = pdl.LinearKDLoss(**LOSS)
    got = causal_lm_kd_loss(student, teacher, inputs, loss)
    want = direct_loss(student, teacher, inputs, loss)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # and the logits the models themselves produce, through kd_loss
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    s = student(**model_inputs).logits
    # the teacher's extra (padded) tokens are dropped: its softmax over the student's vocabulary
    t = teacher(**model_inputs).logits.float()[..., :50]
    y = F.pad(inputs["labels"][:, 1:], (0, 1), value=-100)
    via_logits = pdl.kd_loss(s, t, labels=y, **LOSS)
    torch.testing.assert_close(got, via_logits, rtol=1e-5, atol=1e-5)
    # num_items_in_batch: sum / n
    n = (y != -100).sum()
    torch.testing.assert_close(causal_lm_kd_loss(student, teacher, inputs, loss, num_items_in_batch=2 * n),
                               want / 2, rtol=1e-6, atol=1e-6)


def test_causal_lm_kd_loss_under_torch_compile():
    from pydistill.integrations import causal_lm_kd_loss

    student, teacher = tiny_llama(32, 1, 40, 3), tiny_llama(32, 1, 40, 4)
    inputs = batch(2, 10, 40, 5)
    want = causal_lm_kd_loss(student, teacher, inputs, LOSS)
    (g_want,) = torch.autograd.grad(want, student.lm_head.weight)
    compiled = torch.compile(student, backend="eager")
    got = causal_lm_kd_loss(compiled, teacher, inputs, LOSS)
    (g,) = torch.autograd.grad(got, student.lm_head.weight)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, g_want)


accelerate = peer("accelerate")


def _trainer(tmp_path, student, teacher, data, per_device, accumulation, loss=LOSS, **extra):
    from pydistill.integrations import DistillationTrainer

    args = transformers.TrainingArguments(**{**dict(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
        per_device_train_batch_size=per_device, per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=1.0,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0),
        **extra})
    return DistillationTrainer(model=student, teacher_model=teacher, args=args,
                               distillation_loss=loss, train_dataset=data, eval_dataset=data)


def _rows(inputs):
    n = inputs["input_ids"].shape[0]
    return [{k: v[i] for k, v in inputs.items()} for i in range(n)]


def test_trainer_gradient_accumulation_equals_one_large_batch(tmp_path):
    teacher = tiny_llama(48, 2, 50, 1)
    inputs = batch(8, 12, 50, 7)  # 8 rows, 10 ... 0 scored tokens each after the shift
    data = _rows(inputs)
    init = tiny_llama(32, 2, 50, 0).state_dict()
    grads = {}
    for per_device, accumulation in ((8, 1), (2, 4)):
        student = tiny_llama(32, 2, 50, 0)
        student.load_state_dict(init)
        trainer = _trainer(tmp_path, student, teacher, data, per_device, accumulation, max_steps=1)
        trainer.train()
        # SGD with lr 1, no clipping, no decay: the step is minus the gradient
        grads[per_device] = {k: init[k] - v for k, v in student.state_dict().items()}
    # the gradient of the token-level mean over all 8 rows, computed directly
    student = tiny_llama(32, 2, 50, 0)
    student.load_state_dict(init)
    direct_loss(student, teacher, inputs, pdl.LinearKDLoss(**LOSS)).backward()
    want = {k: p.grad for k, p in student.named_parameters()}
    for per_device in grads:
        for k in want:
            torch.testing.assert_close(grads[per_device][k], want[k], rtol=2e-4, atol=2e-6,
                                       msg=lambda m, k=k: f"per-device batch {per_device}, {k}: {m}")
    # teacher untouched, frozen, eval mode
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_trainer_train_and_evaluate(tmp_path):
    teacher = tiny_llama(48, 2, 50, 1)
    student = tiny_llama(32, 2, 50, 0)
    inputs = batch(8, 12, 50, 8)
    trainer = _trainer(tmp_path, student, teacher, _rows(inputs), 4, 1, max_steps=2,
                       loss=pdl.LinearKDLoss(temperature=2.0, hard_weight=0.5, soft_weight=0.5))
    out = trainer.train()
    assert math.isfinite(out.training_loss)
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    # evaluation: each batch's sum / its own count, averaged over the two batches
    parts = [direct_loss(student, teacher, {k: v[i:i + 4] for k, v in inputs.items()},
                         pdl.LinearKDLoss(temperature=2.0, hard_weight=0.5, soft_weight=0.5)).item()
             for i in (0, 4)]
    assert metrics["eval_loss"] == pytest.approx(sum(parts) / 2, rel=1e-4)


def test_trainer_needs_a_teacher(tmp_path):
    from pydistill.integrations import DistillationTrainer

    with pytest.raises(ValueError, match="teacher_model"):
        DistillationTrainer(model=tiny_llama(16, 1, 20, 0),
                            args=transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                report_to="none"))
    with pytest.raises(TypeError, match="LinearKDLoss"):
        from pydistill.integrations import causal_lm_kd_loss
        causal_lm_kd_loss(tiny_llama(16, 1, 20, 0), tiny_llama(16, 1, 20, 1),
                          batch(1, 4, 20, 0), loss=pdl.KDLoss())


# ---------------------------------------------------------------------------------------------
# Per-model logit transforms: each head's own scale / soft-cap, read from its config

from pydistill.reference import softmax_divergence as SD  # noqa: E402
from pydistill.reference.softmax_divergence import transform_logits  # noqa: E402

V_SMALL = 48
# the transform each architecture's head applies, as its config says it; the two Gemma-2
# roles differ so that a pair of them has two different caps
TRANSFORMS = {
    "llama": {}, "qwen2": {},
    "gemma2": {"student": dict(final_logit_softcapping=2.5), "teacher": dict(final_logit_softcapping=3.0)},
    "cohere": dict(logit_scale=0.5),  # logits * logit_scale
    "granite": dict(logits_scaling=2.0),  # logits / logits_scaling
    "hyperclovax": dict(logits_scaling=1.5),  # logits * logits_scaling
    # a VLM: the transform lives on its text config only (Muse Glimmer: multiplier, then cap)
    "glimmer": dict(output_multiplier=0.7, final_logit_softcapping=2.0),
}
# (transformers config, model) class names
ARCHS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
         "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"), "cohere": ("CohereConfig", "CohereForCausalLM"),
         "granite": ("GraniteConfig", "GraniteForCausalLM"),
         "hyperclovax": ("HyperCLOVAXConfig", "HyperCLOVAXForCausalLM")}


def tiny_lm(kind, role, hidden, seed, vocab=V_SMALL, dtype=torch.float64):
    """A one-layer causal LM of architecture ``kind`` with its transform (TRANSFORMS) and an LM
    head whose raw logits spread ~4, so that the scale and the cap change the softmax."""
    transform = TRANSFORMS[kind].get(role, TRANSFORMS[kind]) if "student" in TRANSFORMS[kind] else TRANSFORMS[kind]
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, **transform)
    torch.manual_seed(seed)
    if kind == "glimmer":
        from transformers.models.muse_glimmer import configuration_muse_glimmer as mg

        config = mg.MuseGlimmerConfig(
            text_config=dict(text, head_dim=hidden // 4),
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
            tie_word_embeddings=False)
        model = transformers.MuseGlimmerForConditionalGeneration(config)
    else:
        config_cls, model_cls = (getattr(transformers, name) for name in ARCHS[kind])
        extra = dict(head_dim=hidden // 4) if kind == "gemma2" else {}
        model = model_cls(config_cls(tie_word_embeddings=False, **text, **extra))
    model = model.to(dtype)
    with torch.no_grad():
        w = model.get_output_embeddings().weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(seed + 100)) * 4 / math.sqrt(hidden))
    return model


def model_logits_loss(student, teacher, inputs, loss_kwargs, student_transform=None, targets=None):
    """The float64 reference: kd_loss of pydistill's reference on the models' own forward
    logits (which include their transforms), with no transform of its own; a teacher with a
    padded vocabulary restricted to the student's (its softmax renormalised over it)."""
    model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
    s = student(**model_inputs).logits
    if student_transform is not None:
        s = transform_logits(s, *student_transform)
    with torch.no_grad():
        t = teacher(**model_inputs).logits
    t = t[..., :s.shape[-1]]
    y = F.pad(inputs["labels"][:, 1:], (0, 1), value=-100) if targets is None else targets
    return SD.kd_loss(s, t, y, SD.KDConfig(**loss_kwargs))


def assert_same_loss_and_grads(student, got, want):
    params = [p for p in student.parameters() if p.requires_grad]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g_got = torch.autograd.grad(got, params, allow_unused=True)
    g_want = torch.autograd.grad(want, params, allow_unused=True)
    assert sum(g is not None for g in g_want) > 2
    for (name, _), a, b in zip(student.named_parameters(), g_got, g_want):
        assert (a is None) == (b is None), name
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("kind", list(TRANSFORMS))
def test_model_logits_include_their_transform(kind):
    """What the reference relies on: forward(...).logits = cap(a * lm_head(h)) with (a, cap)
    from logit_transform, and the transform is not the identity at these sizes."""
    from pydistill.integrations.hf import logit_transform

    model = tiny_lm(kind, "student", 32, 0)
    inputs = batch(2, 7, V_SMALL, 1)
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**model_inputs).logits
    raw = model.get_output_embeddings()(model.base_model(**model_inputs).last_hidden_state)
    scale, cap = logit_transform(model)
    torch.testing.assert_close(logits, transform_logits(raw, scale, cap), rtol=1e-12, atol=1e-12)
    if TRANSFORMS[kind]:
        assert (logits - raw).abs().max() > 0.5


PAIRS = [
    ("gemma2", "gemma2"),  # two different caps
    ("llama", "gemma2"),  # a Gemma-2 teacher into a Llama student
    ("gemma2", "qwen2"),
    ("cohere", "llama"), ("qwen2", "cohere"),
    ("granite", "llama"), ("llama", "granite"),
    ("cohere", "gemma2"), ("granite", "cohere"),
    ("hyperclovax", "gemma2"), ("qwen2", "hyperclovax"),
    ("glimmer", "llama"), ("qwen2", "glimmer"),
]


@pytest.mark.parametrize("student_kind,teacher_kind", PAIRS)
def test_causal_lm_kd_loss_applies_each_models_transform(student_kind, teacher_kind):
    from pydistill.integrations import causal_lm_kd_loss

    student = tiny_lm(student_kind, "student", 32, 0)
    teacher = tiny_lm(teacher_kind, "teacher", 48, 1)
    inputs = batch(3, 9, V_SMALL, 2)
    got = causal_lm_kd_loss(student, teacher, inputs, pdl.LinearKDLoss(**LOSS))
    assert_same_loss_and_grads(student, got, model_logits_loss(student, teacher, inputs, LOSS))


def test_padded_teacher_vocabulary_with_transforms():
    from pydistill.integrations import causal_lm_kd_loss

    student = tiny_lm("cohere", "student", 32, 3)
    teacher = tiny_lm("gemma2", "teacher", 48, 4, vocab=V_SMALL + 5)
    inputs = batch(3, 9, V_SMALL, 5)
    got = causal_lm_kd_loss(student, teacher, inputs, pdl.LinearKDLoss(**LOSS))
    assert_same_loss_and_grads(student, got, model_logits_loss(student, teacher, inputs, LOSS))


def test_loss_transforms_and_the_configs():
    """The loss may repeat a config's transform (same result), set one where a config declares
    none (applied), but not contradict one (ValueError naming the argument and the field)."""
    from pydistill.integrations import causal_lm_kd_loss

    gemma_s, gemma_t = tiny_lm("gemma2", "student", 32, 6), tiny_lm("gemma2", "teacher", 48, 7)
    inputs = batch(2, 8, V_SMALL, 8)
    want = causal_lm_kd_loss(gemma_s, gemma_t, inputs, LOSS)
    same = causal_lm_kd_loss(gemma_s, gemma_t, inputs, dict(LOSS, student_softcap=2.5, teacher_softcap=3.0))
    torch.testing.assert_close(same, want, rtol=0, atol=0)
    for bad, words in ((dict(student_softcap=2.0), r"student_softcap: the loss says 2\.0.*2\.5.*final_logit_softcapping"),
                       (dict(softcap=3.0), r"student_softcap: the loss says 3\.0"),
                       (dict(teacher_softcap=2.5), r"teacher_softcap")):
        with pytest.raises(ValueError, match=words):
            causal_lm_kd_loss(gemma_s, gemma_t, inputs, dict(LOSS, **bad))
    cohere = tiny_lm("cohere", "teacher", 48, 9)
    with pytest.raises(ValueError, match=r"teacher_logit_scale: the loss says 0\.25.*0\.5.*logit_scale"):
        causal_lm_kd_loss(gemma_s, cohere, inputs, dict(LOSS, teacher_logit_scale=0.25))
    granite = tiny_lm("granite", "teacher", 48, 9)
    same = causal_lm_kd_loss(gemma_s, granite, inputs, dict(LOSS, teacher_logit_scale=0.5))
    torch.testing.assert_close(same, causal_lm_kd_loss(gemma_s, granite, inputs, LOSS), rtol=0, atol=0)
    # a Llama student's config declares nothing: the loss's transform is applied to its logits
    llama = tiny_lm("llama", "student", 32, 10)
    got = causal_lm_kd_loss(llama, gemma_t, inputs,
                            dict(LOSS, student_logit_scale=0.5, student_softcap=4.0))
    assert_same_loss_and_grads(llama, got, model_logits_loss(llama, gemma_t, inputs, LOSS, (0.5, 4.0)))


def test_logit_transform_reads_configs_as_trl():
    """TRL 1.16's DistillationTrainer rule: logit_scale, else output_multiplier, else
    lm_head_multiplier, else 1 / logits_scaling (times it for hyperclovax); None: 1.0;
    final_logit_softcapping; a VLM's text config."""
    from types import SimpleNamespace as C

    from pydistill.integrations.hf import logit_transform

    assert logit_transform(C()) == (1.0, None)
    assert logit_transform(C(logit_scale=None, final_logit_softcapping=None)) == (1.0, None)
    assert logit_transform(C(logit_scale=0.25, output_multiplier=3.0, logits_scaling=8.0)) == (0.25, None)
    assert logit_transform(C(logit_scale=None, output_multiplier=0.2, lm_head_multiplier=5.0)) == (0.2, None)
    assert logit_transform(C(lm_head_multiplier=5.0, logits_scaling=8.0)) == (5.0, None)
    assert logit_transform(C(model_type="granite", logits_scaling=8.0)) == (0.125, None)
    assert logit_transform(C(model_type="minicpm3", logits_scaling=4)) == (0.25, None)
    assert logit_transform(C(model_type="hyperclovax", logits_scaling=8.0)) == (8.0, None)
    assert logit_transform(C(final_logit_softcapping=30.0)) == (1.0, 30.0)
    # the real configs
    assert logit_transform(transformers.HyperCLOVAXConfig(logits_scaling=1.5)) == (1.5, None)
    assert logit_transform(transformers.GraniteConfig(logits_scaling=4.0)) == (0.25, None)
    assert logit_transform(transformers.CohereConfig()) == (0.0625, None)
    assert logit_transform(transformers.Gemma2Config()) == (1.0, 30.0)
    assert logit_transform(transformers.LlamaConfig()) == (1.0, None)
    # a VLM: the fields are on the text config, read through get_text_config()
    vlm = C(final_logit_softcapping=None, get_text_config=lambda: C(logit_scale=0.5, final_logit_softcapping=7.0))
    assert logit_transform(vlm) == (0.5, 7.0)
    gemma3 = transformers.Gemma3Config(text_config=dict(final_logit_softcapping=20.0))
    assert logit_transform(gemma3) == (1.0, 20.0)
    # a model: its config; a module without one: the identity
    assert logit_transform(tiny_lm("hyperclovax", "student", 16, 0)) == (1.5, None)
    assert logit_transform(torch.nn.Linear(2, 3)) == (1.0, None)


# ---------------------------------------------------------------------------------------------
# Mixed precision: the models run as a plain Trainer runs them

def _record_backbone(model, seen):
    """Record, per call of the backbone (model.model), its output and whether autocast was on."""
    def hook(module, args, out):
        seen.append((out.last_hidden_state.detach().clone(), torch.is_autocast_enabled("cpu")))
    return model.model.register_forward_hook(hook)


def _first_backbone_outputs(tmp_path, trainer_cls, bf16, **kwargs):
    """One training step on one batch of 4 rows; what the student's (and teacher's) backbone
    returned in it."""
    inputs = batch(4, 10, 50, 21)
    student = tiny_llama(32, 2, 50, 0)
    student_seen, teacher_seen = [], []
    _record_backbone(student, student_seen)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, per_device_train_batch_size=4, max_steps=1,
        bf16=bf16, seed=0, train_sampling_strategy="sequential")
    if trainer_cls is transformers.Trainer:
        trainer = transformers.Trainer(model=student, args=args, train_dataset=_rows(inputs))
    else:
        teacher = tiny_llama(48, 2, 50, 1)
        _record_backbone(teacher, teacher_seen)
        trainer = trainer_cls(model=student, teacher_model=teacher, args=args,
                              train_dataset=_rows(inputs), **kwargs)
    trainer.train()
    return student_seen[0], (teacher_seen[0] if teacher_seen else None), inputs, trainer


def test_trainer_bf16_runs_the_models_under_autocast_as_trainer(tmp_path):
    """TrainingArguments(bf16=True): the student's backbone output under DistillationTrainer is
    the plain Trainer's under its bf16 autocast (bit for bit), and differs from float32; the
    teacher runs under the same autocast."""
    from pydistill.integrations import DistillationTrainer

    (plain, plain_autocast), _, _, _ = _first_backbone_outputs(tmp_path, transformers.Trainer, True)
    (got, got_autocast), (teacher_got, teacher_autocast), inputs, trainer = _first_backbone_outputs(
        tmp_path, DistillationTrainer, True, distillation_loss=LOSS)
    (fp32, fp32_autocast), (teacher_fp32, _), _, _ = _first_backbone_outputs(
        tmp_path, DistillationTrainer, False, distillation_loss=LOSS)
    assert plain_autocast and got_autocast and teacher_autocast and not fp32_autocast
    torch.testing.assert_close(got, plain, rtol=0, atol=0)
    assert (got - fp32).abs().max() > 1e-3
    teacher = tiny_llama(48, 2, 50, 1)
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = teacher.model(**model_inputs).last_hidden_state
    torch.testing.assert_close(teacher_got, want, rtol=0, atol=0)
    assert (teacher_got - teacher_fp32).abs().max() > 1e-3


def test_causal_lm_kd_loss_on_an_accelerate_prepared_model():
    """A model prepared by accelerate for bf16 runs under accelerate's autocast (the forward it
    wrapped is replaced for the fused call, its autocast is entered), the head in bf16 and the
    loss in float32: the value of the eager loss on the models' own bf16 logits."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from pydistill.integrations import causal_lm_kd_loss

    student, teacher = tiny_llama(32, 2, 50, 0), tiny_llama(48, 2, 50, 1)
    inputs = batch(3, 9, 50, 22)
    fp32 = causal_lm_kd_loss(student, teacher, inputs, LOSS)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model_logits_loss(student, teacher, inputs, LOSS)
    AcceleratorState._reset_state(True)
    try:
        accelerator = Accelerator(cpu=True, mixed_precision="bf16")
        prepared = accelerator.prepare_model(student)
        got = causal_lm_kd_loss(prepared, accelerator.prepare_model(teacher, evaluation_mode=True),
                                inputs, LOSS)
    finally:
        AcceleratorState._reset_state(True)
    assert got.dtype == torch.float32
    # the loss from bf16 logits rounds them; the fused one keeps the float32 accumulation
    torch.testing.assert_close(got, want.float(), rtol=2e-2, atol=2e-2)
    # the same call under an explicit bf16 autocast, bit for bit; not the float32 run
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explicit = causal_lm_kd_loss(student, teacher, inputs, LOSS)
    torch.testing.assert_close(got, explicit, rtol=0, atol=0)
    assert got.item() != fp32.item()


# ---------------------------------------------------------------------------------------------
# shift_labels: already-shifted labels (padding-free collators, context parallelism)

def with_shift_labels(inputs, prompt=3):
    """labels = the whole row (no prompt masked), shift_labels = the shifted labels with the
    first ``prompt`` targets masked: the prompt is masked in shift_labels only."""
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    shift = F.pad(labels[:, 1:], (0, 1), value=-100)
    shift[:, :prompt] = -100
    return dict(inputs, labels=labels, shift_labels=shift)


def test_causal_lm_kd_loss_honours_shift_labels():
    from pydistill.integrations import causal_lm_kd_loss

    student, teacher = tiny_lm("llama", "student", 32, 30), tiny_lm("qwen2", "teacher", 48, 31)
    inputs = with_shift_labels(batch(3, 9, V_SMALL, 32))
    got = causal_lm_kd_loss(student, teacher, inputs, pdl.LinearKDLoss(**LOSS))
    want = model_logits_loss(student, teacher, inputs, LOSS, targets=inputs["shift_labels"])
    assert_same_loss_and_grads(student, got, want)
    unshifted = model_logits_loss(student, teacher, inputs, LOSS)  # labels alone: no prompt mask
    assert abs(got.item() - unshifted.item()) > 1e-3
    # without labels at all
    only = {k: v for k, v in inputs.items() if k != "labels"}
    torch.testing.assert_close(causal_lm_kd_loss(student, teacher, only, LOSS), got, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"shift_labels.*expected shape \(3, 9\)"):
        causal_lm_kd_loss(student, teacher, dict(inputs, shift_labels=inputs["shift_labels"][:, 1:]), LOSS)


def test_trainer_counts_and_scores_shift_labels(tmp_path):
    """Gradient accumulation with shift_labels: Trainer counts the scored tokens from them, the
    loss scores them; one step equals the eager gradient of the token-level mean."""
    teacher = tiny_llama(48, 2, 50, 1)
    inputs = with_shift_labels(batch(8, 12, 50, 33))
    init = tiny_llama(32, 2, 50, 0).state_dict()
    student = tiny_llama(32, 2, 50, 0)
    student.load_state_dict(init)
    _trainer(tmp_path, student, teacher, _rows(inputs), 2, 4, max_steps=1).train()
    step = {k: init[k] - v for k, v in student.state_dict().items()}
    eager = tiny_llama(32, 2, 50, 0)
    eager.load_state_dict(init)
    model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
    with torch.no_grad():
        t = teacher(**model_inputs).logits
    pdl.kd_loss(eager(**model_inputs).logits, t, labels=inputs["shift_labels"], **LOSS).backward()
    for k, p in eager.named_parameters():
        torch.testing.assert_close(step[k], p.grad, rtol=2e-4, atol=2e-6, msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------------------------------------
# Vocabularies: a padded teacher head, another tokenizer; non-finite losses

def test_padded_teacher_head_default_loss_is_the_restricted_teacher(tmp_path):
    """A teacher head padded beyond the student's vocabulary (one tokenizer), with the default
    forward KL: the teacher restricted to the student's vocabulary and renormalised, finite,
    through the function and the Trainer."""
    from pydistill.integrations import causal_lm_kd_loss

    student = tiny_lm("qwen2", "student", 32, 40)
    teacher = tiny_lm("qwen2", "teacher", 48, 41, vocab=V_SMALL + 16)
    with torch.no_grad():  # the padding rows would dominate the teacher's softmax
        teacher.lm_head.weight[V_SMALL:] *= 10
    inputs = batch(3, 9, V_SMALL, 42)
    got = causal_lm_kd_loss(student, teacher, inputs)
    assert torch.isfinite(got)
    assert_same_loss_and_grads(student, got, model_logits_loss(student, teacher, inputs, {}))
    student, teacher = student.float(), teacher.float()
    trainer = _trainer(tmp_path, student, teacher, _rows(inputs), 3, 1, loss=None, max_steps=1,
                       logging_strategy="steps", logging_steps=1)
    want = model_logits_loss(student, teacher, inputs, {}).item()
    out = trainer.train()
    assert out.training_loss == pytest.approx(want, rel=1e-5)
    assert trainer.state.log_history[0]["loss"] == pytest.approx(want, rel=1e-4)


def _tokenizer(words):
    tokenizers = peer("tokenizers")
    vocab = {w: i for i, w in enumerate(["[UNK]"] + words)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_another_tokenizer_is_refused_with_a_pointer_to_uld(tmp_path):
    from pydistill.integrations import DistillationTrainer, causal_lm_kd_loss
    from pydistill.integrations.hf import vocabulary_padding_limit

    assert vocabulary_padding_limit(151936, 152064) >= 128  # Qwen2.5 0.5B / 7B: padding
    assert vocabulary_padding_limit(32000, 32768) < 768  # Llama-2 / Mistral v0.3: not
    student = tiny_lm("llama", "student", 32, 43)
    with pytest.raises(ValueError, match=r"teacher: its LM head has 400 rows, the student's 48.*uld_loss"):
        causal_lm_kd_loss(student, tiny_lm("llama", "teacher", 48, 44, vocab=400), batch(2, 6, V_SMALL, 45))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    words = [f"w{i}" for i in range(V_SMALL - 1)]
    with pytest.raises(ValueError, match=r"teacher_processing_class: its vocabulary differs.*uld_loss"):
        DistillationTrainer(model=student, args=args, teacher_model=tiny_lm("llama", "teacher", 48, 46),
                            processing_class=_tokenizer(words),
                            teacher_processing_class=_tokenizer(words[::-1]))
    DistillationTrainer(model=student, args=args, teacher_model=tiny_lm("llama", "teacher", 48, 46),
                        processing_class=_tokenizer(words), teacher_processing_class=_tokenizer(words))


def test_trainer_never_logs_a_nonfinite_loss(tmp_path):
    """Reverse KL against a teacher head shorter than the student's (-inf beyond its end) is
    infinite: the Trainer raises by default; with nonfinite_loss='skip' it warns and the step
    leaves the student unchanged (zero gradient)."""
    inputs = batch(4, 8, V_SMALL + 8, 47)
    inputs["input_ids"] %= V_SMALL
    inputs["labels"] = inputs["labels"].where(inputs["labels"] < 0, inputs["labels"] % V_SMALL)
    loss = dict(divergence="reverse_kl")
    teacher = tiny_lm("llama", "teacher", 48, 48, dtype=torch.float32)

    def student():
        return tiny_lm("llama", "student", 32, 49, vocab=V_SMALL + 8, dtype=torch.float32)

    with pytest.raises(FloatingPointError, match=r"loss is inf at step 0.*nonfinite_loss='skip'"):
        _trainer(tmp_path, student(), teacher, _rows(inputs), 4, 1, loss=loss, max_steps=1).train()
    model = student()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    from pydistill.integrations import DistillationTrainer

    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                          save_strategy="no", max_steps=1, optim="sgd",
                                          per_device_train_batch_size=4, logging_steps=1)
    trainer = DistillationTrainer(model=model, args=args, teacher_model=teacher, distillation_loss=loss,
                                  train_dataset=_rows(inputs), nonfinite_loss="skip")
    with pytest.warns(RuntimeWarning, match="micro-batch is skipped"):
        out = trainer.train()
    assert trainer.skipped_nonfinite == 1 and out.training_loss == 0.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, init[k]), k
    with pytest.raises(ValueError, match="nonfinite_loss: expected one of"):
        DistillationTrainer(model=model, args=args, teacher_model=teacher, nonfinite_loss="ignore")


def test_trainer_logs_kd_and_ce_losses(tmp_path):
    """kd_loss and ce_loss beside loss: two optimizer steps of two accumulated micro-batches each
    in one log (learning rate 0: both steps see the initial student), each the token-level mean
    over its accumulated batch, averaged over the steps; against eager code on the logits."""
    teacher, student = tiny_llama(48, 2, 50, 1), tiny_llama(32, 2, 50, 0)
    inputs = batch(8, 12, 50, 51)
    trainer = _trainer(tmp_path, student, teacher, _rows(inputs), 2, 2, max_steps=2,
                       learning_rate=0.0, logging_strategy="steps", logging_steps=2,
                       train_sampling_strategy="sequential")
    trainer.train()
    (logs,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    kd, ce = [], []
    for rows in (slice(0, 4), slice(4, 8)):
        part = {k: v[rows] for k, v in inputs.items()}
        model_inputs = {k: v for k, v in part.items() if k != "labels"}
        with torch.no_grad():
            s, t = student(**model_inputs).logits, teacher(**model_inputs).logits
        y = F.pad(part["labels"][:, 1:], (0, 1), value=-100)
        kd.append(pdl.kd_loss(s, t, labels=y, **dict(LOSS, hard_weight=0.0, soft_weight=1.0)).item())
        ce.append(F.cross_entropy(s.flatten(0, 1), y.flatten(), ignore_index=-100).item())
    assert logs["kd_loss"] == pytest.approx(sum(kd) / 2, rel=1e-5)
    assert logs["ce_loss"] == pytest.approx(sum(ce) / 2, rel=1e-5)
    assert logs["loss"] == pytest.approx(LOSS["soft_weight"] * logs["kd_loss"]
                                         + LOSS["hard_weight"] * logs["ce_loss"], rel=1e-5)

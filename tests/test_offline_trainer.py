"""DistillationTrainer from a stored teacher (no teacher model): tiny Llama students built from
configs, a stand-in store (tests/test_offline_loss.py's ``make_store`` / ``collate``, shaped as
pydistill.offline's), against eager code on the student's own logits."""
import math

import pytest
import torch
import torch.nn.functional as F

import pydistill as pdl

from conftest import peer
from test_offline_loss import collate, make_store

transformers = peer("transformers")
accelerate = peer("accelerate")

from test_integrations import tiny_llama  # noqa: E402  (needs transformers)

VOCAB = 40
LOSS = dict(temperature=2.0, hard_weight=0.4, soft_weight=0.6)


def stored_teacher(method, k=6, temperature=2.0, seed=0):
    """(items, manifest) of a tiny Llama teacher's next-token distributions over sequences of
    different lengths; the teacher is dropped once the store is written."""
    teacher = tiny_llama(24, 1, VOCAB, seed + 100)
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g) for n in (9, 6, 8, 4)]

    def teacher_logits(ids):
        with torch.no_grad():
            return teacher(input_ids=ids[None]).logits[0].float()

    return make_store(teacher_logits, seqs, k=k, temperature=temperature, method=method,
                      samples=k, seed=seed)


def eager_loss(student, batch, method, loss_kwargs, num_items=None):
    """The same loss from the student's own forward logits (B, L, V), written out."""
    model_inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    logits = student(**model_inputs).logits
    y = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    t = batch["teacher_temperature"]
    kw = dict(labels=y, temperature=t, hard_weight=loss_kwargs["hard_weight"],
              soft_weight=loss_kwargs["soft_weight"], reduction="mean" if num_items is None else "sum")
    if method == "topk":
        out = pdl.topk_kd_loss(logits, batch["teacher_logprobs"], batch["teacher_ids"],
                               teacher_temperature=t, **kw)
    else:
        out = pdl.sampled_kd_loss(logits, batch["teacher_logprobs"], batch["teacher_ids"],
                                  teacher_temperature=t, **kw)
    return out if num_items is None else out / num_items


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_offline_loss_equals_eager_on_the_logits(method):
    from pydistill.integrations.hf import causal_lm_offline_kd_loss

    items, manifest = stored_teacher(method)
    batch = collate(items, manifest)
    student = tiny_llama(16, 1, VOCAB, 0)
    params = [p for p in student.parameters() if p.requires_grad]
    got = causal_lm_offline_kd_loss(student, batch, pdl.LinearKDLoss(**LOSS))
    g = torch.autograd.grad(got, params)
    want = eager_loss(student, batch, method, LOSS)
    g_want = torch.autograd.grad(want, params)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _trainer(tmp_path, student, items, manifest, loss=LOSS, **extra):
    from pydistill.integrations import DistillationTrainer

    args = transformers.TrainingArguments(**{**dict(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no",
        logging_strategy="steps", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
        seed=0, per_device_train_batch_size=len(items), per_device_eval_batch_size=len(items),
        optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=0.0, max_steps=1), **extra})
    return DistillationTrainer(model=student, teacher_model=None, args=args,
                               distillation_loss=pdl.LinearKDLoss(**loss), train_dataset=items,
                               eval_dataset=items,
                               data_collator=lambda features: collate(features, manifest))


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_trainer_step_from_a_store_equals_eager(tmp_path, method):
    # one SGD step (lr 1): the parameter change is minus the gradient of the token-level mean
    # over the batch, computed eagerly from the student's logits; logs as the online path
    items, manifest = stored_teacher(method)
    student = tiny_llama(16, 1, VOCAB, 0)
    init = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = _trainer(tmp_path, student, items, manifest)
    trainer.train()
    step = {k: init[k] - v for k, v in student.state_dict().items()}
    fresh = tiny_llama(16, 1, VOCAB, 0)
    fresh.load_state_dict(init)
    batch = collate(items, manifest)
    want = eager_loss(fresh, batch, method, LOSS)
    want.backward()
    for name, p in fresh.named_parameters():
        torch.testing.assert_close(step[name], p.grad, rtol=2e-4, atol=2e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
    (logs,) = [e for e in trainer.state.log_history if "loss" in e]
    assert logs["loss"] == pytest.approx(want.item(), rel=1e-5)
    assert logs["loss"] == pytest.approx(LOSS["soft_weight"] * logs["kd_loss"]
                                         + LOSS["hard_weight"] * logs["ce_loss"], rel=1e-5)
    with torch.no_grad():
        kd = eager_loss(fresh, batch, method, dict(LOSS, hard_weight=0.0, soft_weight=1.0))
    assert logs["kd_loss"] == pytest.approx(kd.item(), rel=1e-5)
    assert math.isfinite(trainer.evaluate()["eval_loss"])


def test_a_teacher_model_is_not_required_but_a_teacher_is(tmp_path):
    from pydistill.integrations import DistillationTrainer

    items, manifest = stored_teacher("topk")
    trainer = _trainer(tmp_path, tiny_llama(16, 1, VOCAB, 0), items, manifest)
    assert trainer.teacher_model is None
    assert math.isfinite(trainer.train().training_loss)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    plain = [{"input_ids": x["input_ids"]} for x in items]
    with pytest.raises(ValueError, match=r"teacher_model: required .* unless the dataset's items "
                                         r"carry a stored teacher"):
        DistillationTrainer(model=tiny_llama(16, 1, VOCAB, 0), args=args, train_dataset=plain)
    # a teacher model beside a stored teacher: which one is meant is not guessed
    both = DistillationTrainer(model=tiny_llama(16, 1, VOCAB, 0), args=args,
                               teacher_model=tiny_llama(16, 1, VOCAB, 1), train_dataset=items)
    with pytest.raises(ValueError, match=r"carries a stored teacher .* and a teacher_model was given"):
        both.compute_loss(both.model, collate(items, manifest))


def test_trainer_refuses_another_temperature(tmp_path):
    items, manifest = stored_teacher("topk", temperature=2.0)
    trainer = _trainer(tmp_path, tiny_llama(16, 1, VOCAB, 0), items, manifest,
                       loss=dict(LOSS, temperature=1.0))
    with pytest.raises(ValueError, match=r"captured at temperature 2.0, got temperature=1.0"):
        trainer.train()


def test_trainer_checks_the_first_batch_of_a_store(tmp_path):
    # raw logits stored by mistake: refused at the first batch, by the check that runs on any
    # device (validate=True: it names the batch's key, not the loss argument)
    items, manifest = stored_teacher("topk")
    bad = [dict(x, teacher_logprobs=x["teacher_logprobs"] + 8.0) for x in items]
    trainer = _trainer(tmp_path, tiny_llama(16, 1, VOCAB, 0), bad, manifest)
    with pytest.raises(ValueError, match=r"teacher\['teacher_logprobs'\]: expected log-probabilities"):
        trainer.train()

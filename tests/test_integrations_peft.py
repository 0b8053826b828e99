"""The Trainer integration (causal_lm_kd_loss, DistillationTrainer) with PEFT models: LoRA on
attention, MLP and lm_head, modules_to_save, adapters on the teacher, LoRA dropout; tiny Llama
and Qwen2 models built from configs, in float64, against the float64 reference loss on the
models' own ``model(**batch).logits``: the value and the gradient of every trainable parameter
(every adapter's, the head's included)."""
import pytest
import torch

import pydistill as pdl

from conftest import peer

peft = peer("peft")
transformers = peer("transformers")

from test_integrations import (LOSS, V_SMALL, _rows, _trainer, assert_same_loss_and_grads,  # noqa: E402
                               batch, model_logits_loss, tiny_lm)

ATTENTION_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora(model, target_modules, modules_to_save=None, dropout=0.0, **extra):
    """A PEFT model with random LoRA weights (B is not zero: every adapter changes the output
    and gets a gradient at once), in the base model's dtype."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules,
                             modules_to_save=modules_to_save, lora_dropout=dropout,
                             init_lora_weights=False, **extra)
    torch.manual_seed(0)
    return peft.get_peft_model(model, config).to(torch.float64)


def _check(student, teacher, inputs):
    from pydistill.integrations import causal_lm_kd_loss

    got = causal_lm_kd_loss(student, teacher, inputs, pdl.LinearKDLoss(**LOSS))
    want = model_logits_loss(student, teacher, inputs, LOSS)
    assert_same_loss_and_grads(student, got, want)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    return trainable


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_lora_on_attention_mlp_and_lm_head(kind):
    student = lora(tiny_lm(kind, "student", 32, 0), ATTENTION_MLP + ["lm_head"])
    teacher = tiny_lm("qwen2" if kind == "llama" else "llama", "teacher", 48, 1)
    trainable = _check(student, teacher, batch(3, 9, V_SMALL, 2))
    assert any("lm_head.lora_A" in n for n in trainable) and any("lm_head.lora_B" in n for n in trainable)
    assert any("q_proj.lora_A" in n for n in trainable) and any("down_proj.lora_B" in n for n in trainable)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_modules_to_save_lm_head_and_embeddings(kind):
    student = lora(tiny_lm(kind, "student", 32, 3), ["q_proj", "v_proj"],
                   modules_to_save=["lm_head", "embed_tokens"])
    trainable = _check(student, tiny_lm("llama", "teacher", 48, 4), batch(3, 9, V_SMALL, 5))
    assert any("lm_head.modules_to_save" in n for n in trainable)


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")
def test_lora_teacher_and_student_with_lora_bias_and_two_adapters():
    """A PEFT teacher with LoRA on its head (its adapters are part of its logits); a student
    with lora_bias on the head and a second adapter, both active."""
    teacher = lora(tiny_lm("qwen2", "teacher", 48, 6), ["q_proj", "lm_head"])
    teacher.requires_grad_(False)
    student = lora(tiny_lm("llama", "student", 32, 7), ["v_proj", "lm_head"], lora_bias=True)
    student.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["lm_head", "up_proj"],
                                                  init_lora_weights=False))
    student.base_model.set_adapter(["default", "second"])
    student.to(torch.float64)
    trainable = _check(student, teacher, batch(3, 9, V_SMALL, 8))
    assert any("lm_head.lora_B.second" in n for n in trainable)
    assert any("lm_head.lora_B.default.bias" in n for n in trainable)


def test_lora_dropout_is_the_adapters_own():
    """Training mode with LoRA dropout: the fused path draws the same dropout masks, in the
    same order, as the model's own forward (seeded), so the two agree."""
    from pydistill.integrations import causal_lm_kd_loss

    student = lora(tiny_lm("llama", "student", 32, 9), ["q_proj", "lm_head"], dropout=0.3).train()
    teacher = tiny_lm("qwen2", "teacher", 48, 10)
    inputs = batch(3, 9, V_SMALL, 11)
    torch.manual_seed(5)
    got = causal_lm_kd_loss(student, teacher, inputs, pdl.LinearKDLoss(**LOSS))
    torch.manual_seed(5)
    want = model_logits_loss(student, teacher, inputs, LOSS)
    assert_same_loss_and_grads(student, got, want)
    torch.manual_seed(6)
    other = causal_lm_kd_loss(student, teacher, inputs, pdl.LinearKDLoss(**LOSS))
    assert abs(other.item() - got.item()) > 1e-6  # the dropout acts


def test_disabled_and_merged_adapters():
    from pydistill.integrations import causal_lm_kd_loss

    student = lora(tiny_lm("llama", "student", 32, 12), ["q_proj", "lm_head"])
    teacher = tiny_lm("qwen2", "teacher", 48, 13)
    inputs = batch(2, 8, V_SMALL, 14)
    with student.disable_adapter():
        got = causal_lm_kd_loss(student, teacher, inputs, LOSS)
        torch.testing.assert_close(got, model_logits_loss(student, teacher, inputs, LOSS),
                                   rtol=1e-10, atol=1e-12)
    enabled = causal_lm_kd_loss(student, teacher, inputs, LOSS)
    assert abs(enabled.item() - got.item()) > 1e-4
    student.merge_adapter()
    torch.testing.assert_close(causal_lm_kd_loss(student, teacher, inputs, LOSS), enabled,
                               rtol=1e-9, atol=1e-10)


def test_dora_on_the_head_is_refused():
    from pydistill.integrations import causal_lm_kd_loss

    student = lora(tiny_lm("llama", "student", 32, 15), ["lm_head"], use_dora=True)
    with pytest.raises(ValueError, match=r"student: the LM head's LoRA adapter 'default' is a .*Dora"):
        causal_lm_kd_loss(student, tiny_lm("llama", "teacher", 48, 16), batch(2, 8, V_SMALL, 17), LOSS)


def test_trainer_step_on_a_peft_student(tmp_path):
    """DistillationTrainer with a PEFT student: one SGD step (lr 1) moves every adapter by minus
    the eager gradient of the token-level mean; the base weights do not move."""
    teacher = tiny_lm("qwen2", "teacher", 48, 18, dtype=torch.float32)
    student = lora(tiny_lm("llama", "student", 32, 19, dtype=torch.float32),
                   ATTENTION_MLP + ["lm_head"]).float()
    inputs = batch(4, 10, V_SMALL, 20)
    init = {k: v.clone() for k, v in student.state_dict().items()}
    model_logits_loss(student, teacher, inputs, LOSS).backward()
    want = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}
    student.zero_grad(set_to_none=True)
    _trainer(tmp_path, student, teacher, _rows(inputs), 4, 1, max_steps=1).train()
    state = dict(student.named_parameters())
    for n, g in want.items():
        torch.testing.assert_close(init[n] - state[n].detach(), g, rtol=2e-4, atol=2e-6,
                                   msg=lambda m, n=n: f"{n}: {m}")
    for n, p in state.items():
        if not p.requires_grad:
            assert torch.equal(p.detach(), init[n]), n

"""pydistill.integrations.trl_chunked_divergence_loss against TRL 1.16's own
``trl.trainer.distillation_trainer._chunked_divergence_loss`` (its chunked PyTorch path on the
CPU, its Triton kernels on a GPU): loss, entropy sum, valid count and the student's gradients,
for every beta, temperatures, logit scales, soft-caps, masks, biases, num_items_in_batch and
dtypes; then the one-line patch through TRL's own DistillationTrainer._compute_loss."""
import math
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from pydistill.integrations import trl_chunked_divergence_loss
from pydistill.reference import softmax_divergence as SD

from conftest import DEVICE, INTERPRETER_PROBLEM, peer

distillation_trainer = peer("trl.trainer.distillation_trainer")
trl_loss = distillation_trainer._chunked_divergence_loss

B, K, H_S, H_T, V = 3, 7, 16, 24, 301
BETAS = [0.0, 0.3, 0.5, 1.0]
# (temperature, student scale, teacher scale, student soft-cap, teacher soft-cap)
TRANSFORMS = {
    "plain": (1.0, 1.0, 1.0, None, None),
    "temperature": (2.0, 1.0, 1.0, None, None),
    "scales": (1.0, 0.25, 2.0, None, None),
    "student-softcap": (1.0, 1.0, 1.0, 4.0, None),
    "teacher-softcap": (1.5, 1.0, 1.0, None, 4.0),
    "both-softcaps": (1.0, 1.0, 1.0, 3.0, 8.0),
    "everything": (0.7, 1.5, 0.5, 6.0, 2.5),
}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, seed, scale=1.0):
    return torch.randn(shape, generator=_gen(seed)) * scale


def make_inputs(*, dtype=torch.float32, bias=True, mask="partial", seed=0):
    """Both heads (logits spread ~3; the teacher's hidden width differs) and a completion mask:
    ``partial`` (padding at row ends, a hole), ``ones``, ``zeros``; an int mask, as TRL's."""
    def leaf(x, grad):
        return x.to(dtype=dtype, device=DEVICE).requires_grad_(grad)

    inputs = {
        "student_hidden_states": leaf(_randn((B, K, H_S), seed), True),
        "teacher_hidden_states": leaf(_randn((B, K, H_T), seed + 1), False),
        "student_lm_head_weight": leaf(_randn((V, H_S), seed + 2, 3 / math.sqrt(H_S)), True),
        "teacher_lm_head_weight": leaf(_randn((V, H_T), seed + 3, 3 / math.sqrt(H_T)), False),
    }
    if bias:
        inputs["student_lm_head_bias"] = leaf(_randn((V,), seed + 4), True)
        inputs["teacher_lm_head_bias"] = leaf(_randn((V,), seed + 5), False)
    m = torch.ones(B, K, dtype=torch.long)
    if mask == "partial":
        m[0, 5:] = 0
        m[1, 2] = 0
        m[2, 1:] = 0
    elif mask == "zeros":
        m.zero_()
    inputs["completion_mask"] = m.to(DEVICE)
    return inputs


def transform_kwargs(name):
    temperature, a_s, a_t, c_s, c_t = TRANSFORMS[name]
    return dict(temperature=temperature, student_logit_scale=a_s, teacher_logit_scale=a_t,
                student_final_logit_softcapping=c_s, teacher_final_logit_softcapping=c_t)


def student_leaves(inputs):
    return [inputs[k] for k in ("student_hidden_states", "student_lm_head_weight",
                                "student_lm_head_bias") if k in inputs]


def fresh(inputs):
    """The same tensors as new leaves (each implementation gets its own graph)."""
    return {k: v.detach().clone().requires_grad_(v.requires_grad) if v.is_floating_point() else v
            for k, v in inputs.items()}


def run(fn, inputs, beta, grad_out=0.7, **kw):
    inputs = fresh(inputs)
    loss, entropy_sum, n_valid = fn(**inputs, beta=beta, **kw)
    grads = torch.autograd.grad(loss * grad_out, student_leaves(inputs), allow_unused=True)
    return loss.detach(), entropy_sum, n_valid, grads


def reference(inputs, beta, *, temperature=1.0, student_logit_scale=1.0, teacher_logit_scale=1.0,
              student_final_logit_softcapping=None, teacher_final_logit_softcapping=None,
              num_items_in_batch=None):
    """The loss, from pydistill's float64 reference on the materialised logits (the jsd of
    TRL's beta, no T^2, sum over the mask), and the entropy sum."""
    x = {k: v.detach().double().cpu() if v.is_floating_point() else v.cpu() for k, v in inputs.items()}
    s = x["student_hidden_states"] @ x["student_lm_head_weight"].T
    t = x["teacher_hidden_states"] @ x["teacher_lm_head_weight"].T
    if "student_lm_head_bias" in x:
        s, t = s + x["student_lm_head_bias"], t + x["teacher_lm_head_bias"]
    cfg = SD.KDConfig(divergence="jsd", beta=beta, temperature=temperature, t2=False,
                      student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
                      student_softcap=student_final_logit_softcapping,
                      teacher_softcap=teacher_final_logit_softcapping, reduction="sum")
    valid = x["completion_mask"] != 0
    labels = torch.where(valid, 0, -100)
    total = SD.kd_loss(s, t, labels, cfg)
    log_q = torch.log_softmax(cfg.student_transform(s) / temperature, -1)
    entropy = -(log_q.exp() * log_q).sum(-1)[valid].sum()
    denom = max(int(valid.sum()), 1) if num_items_in_batch is None else float(num_items_in_batch)
    return total / denom, entropy


def assert_matches_trl(inputs, beta, *, grad_rtol=2e-5, loss_rtol=2e-5, **kw):
    got = run(trl_chunked_divergence_loss, inputs, beta, **kw)
    want = run(trl_loss, inputs, beta, **kw)
    loss, entropy, n_valid, grads = got
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert entropy.dtype == torch.float32 and not entropy.requires_grad
    assert n_valid.dtype == want[2].dtype and n_valid.device == want[2].device
    assert int(n_valid) == int(want[2])
    torch.testing.assert_close(loss, want[0], rtol=loss_rtol, atol=1e-6)
    torch.testing.assert_close(entropy, want[1], rtol=loss_rtol, atol=1e-5)
    for name, g, g_want in zip(("d hidden", "d weight", "d bias"), grads, want[3]):
        assert g is not None and g.dtype == g_want.dtype and g.shape == g_want.shape, name
        scale = g_want.float().abs().max().item()
        torch.testing.assert_close(g.float(), g_want.float(), rtol=grad_rtol,
                                   atol=grad_rtol * max(scale, 1e-3),
                                   msg=lambda m, name=name: f"{name}: {m}")
    return got


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("beta", BETAS)
def test_matches_trl(beta, transform):
    inputs = make_inputs()
    kw = transform_kwargs(transform)
    loss, entropy, _, _ = assert_matches_trl(inputs, beta, **kw)
    # and both are the math: pydistill's float64 reference on the materialised logits
    want_loss, want_entropy = reference(inputs, beta, **kw)
    torch.testing.assert_close(loss.double().cpu(), want_loss, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(entropy.double().cpu(), want_entropy, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("num_items", [None, 11, "tensor"])
@pytest.mark.parametrize("mask", ["partial", "ones", "zeros"])
@pytest.mark.parametrize("bias", [True, False])
def test_masks_biases_and_num_items(mask, bias, num_items):
    inputs = make_inputs(bias=bias, mask=mask, seed=10)
    n = torch.tensor(13.0, device=DEVICE) if num_items == "tensor" else num_items
    loss, entropy, n_valid, grads = assert_matches_trl(
        inputs, 0.5, num_items_in_batch=n, **transform_kwargs("everything"))
    if mask == "zeros":  # TRL: 0 / clamp(0, min=1); no NaN anywhere
        assert loss.item() == 0.0 and entropy.item() == 0.0 and int(n_valid) == 0
        assert all(bool((g == 0).all()) for g in grads)


@pytest.mark.parametrize("beta", BETAS)
def test_bfloat16(beta):
    """Both compute float32 logits from the bfloat16 heads; their gradients round differently
    (TRL accumulates them in float32, pydistill in the weight's dtype): within bf16 rounding."""
    inputs = make_inputs(dtype=torch.bfloat16, seed=20)
    loss, _, _, grads = assert_matches_trl(inputs, beta, grad_rtol=3e-2, loss_rtol=1e-4,
                                           **transform_kwargs("everything"))
    assert all(g.dtype == torch.bfloat16 for g in grads)


def test_teacher_gets_no_gradient_and_mixed_dtypes():
    """TRL gives the teacher no gradient even where its tensors require one; a float32 weight
    under bfloat16 hidden states is cast to them (TRL computes in the hidden states' dtype)."""
    inputs = make_inputs(seed=30)
    for k in ("teacher_hidden_states", "teacher_lm_head_weight", "teacher_lm_head_bias"):
        inputs[k].requires_grad_(True)
    loss, _, _ = trl_chunked_divergence_loss(**inputs, beta=0.5)
    loss.backward()
    assert all(inputs[k].grad is None for k in ("teacher_hidden_states", "teacher_lm_head_weight",
                                                 "teacher_lm_head_bias"))
    assert all(x.grad is not None for x in student_leaves(inputs))
    mixed = make_inputs(seed=31, bias=False)
    mixed["student_hidden_states"] = mixed["student_hidden_states"].detach().bfloat16().requires_grad_()
    assert_matches_trl(mixed, 0.3, grad_rtol=3e-2, loss_rtol=1e-4)


def test_autocast():
    """Under autocast both compute in its dtype (TRL's _compute_dtype): float32 master weights
    and hidden states, bfloat16 GEMM inputs, float32 logits."""
    inputs = make_inputs(seed=40)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        got = run(trl_chunked_divergence_loss, inputs, 0.5, **transform_kwargs("scales"))
        want = run(trl_loss, inputs, 0.5, **transform_kwargs("scales"))
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
    for g, g_want in zip(got[3], want[3]):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, g_want, rtol=3e-2, atol=3e-2 * g_want.abs().max().item())


@pytest.mark.skipif(DEVICE.type != "cpu" or INTERPRETER_PROBLEM is not None,
                    reason="the Triton interpreter on CPU tensors")
def test_triton_backend_under_the_interpreter(monkeypatch):
    """The drop-in takes pydistill's backend from PYDISTILL_BACKEND (its signature is TRL's):
    the Triton kernels give the same result."""
    monkeypatch.setenv("PYDISTILL_BACKEND", "triton")
    inputs = make_inputs(seed=50)
    assert_matches_trl(inputs, 0.3, **transform_kwargs("everything"))


def test_signature_is_trls():
    import inspect

    ours, theirs = inspect.signature(trl_chunked_divergence_loss), inspect.signature(trl_loss)
    assert list(ours.parameters) == list(theirs.parameters)
    assert [p.default for p in ours.parameters.values()] == [p.default for p in theirs.parameters.values()]
    assert [p.kind for p in ours.parameters.values()] == [p.kind for p in theirs.parameters.values()]


# ---------------------------------------------------------------------------------------------
# The TRL releases the drop-ins were written for

# "1.9.0" > "1.16" as strings: the check must compare versions
@pytest.mark.parametrize("version,ok", [("1.16.0", True), ("1.16.7", True), ("1.17.0", False),
                                        ("1.15.2", False), ("1.9.0", False), ("2.0.0", False),
                                        ("1.16.0rc1", False), ("nightly", False)])
def test_trl_version_is_checked(monkeypatch, version, ok):
    import trl

    from pydistill.integrations import generalized_jsd_loss, patch_trl

    monkeypatch.setattr(trl, "__version__", version)
    # patch_trl's targets, put back after the test
    monkeypatch.setattr(distillation_trainer, "_chunked_divergence_loss", trl_loss)
    gkd = peer("trl.experimental.gkd.gkd_trainer")
    monkeypatch.setattr(gkd.GKDTrainer, "generalized_jsd_loss", gkd.GKDTrainer.__dict__["generalized_jsd_loss"])
    inputs = make_inputs(seed=80)
    logits = torch.randn(2, 3, 11)
    calls = [lambda: trl_chunked_divergence_loss(**inputs, beta=0.5),
             lambda: generalized_jsd_loss(logits, logits.flip(0)), patch_trl]
    for call in calls:
        if ok:
            call()
        else:
            with pytest.raises(RuntimeError, match=rf"trl: .*{version}.*TRL <1\.17,>=1\.16"):
                call()
    assert (distillation_trainer._chunked_divergence_loss is trl_chunked_divergence_loss) == ok
    assert (gkd.GKDTrainer.generalized_jsd_loss is generalized_jsd_loss) == ok


# ---------------------------------------------------------------------------------------------
# The one-line patch, through TRL's own DistillationTrainer._compute_loss

transformers = peer("transformers")


def tiny_models():
    """A Cohere student (logit_scale) and a Gemma-2 teacher (final_logit_softcapping) with one
    vocabulary: TRL reads both transforms from the configs and passes them on."""
    common = dict(vocab_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    student = transformers.CohereForCausalLM(transformers.CohereConfig(
        hidden_size=32, intermediate_size=64, logit_scale=0.5, tie_word_embeddings=False, **common))
    teacher = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        hidden_size=48, intermediate_size=96, head_dim=12, final_logit_softcapping=5.0,
        **common))
    return student.float().to(DEVICE), teacher.float().eval().to(DEVICE)


class _Trainer:
    """The attributes of a DistillationTrainer that _compute_loss reads (no datasets, no
    accelerate state): TRL's own _compute_loss and _get_last_hidden_state run on it."""
    _compute_loss = distillation_trainer.DistillationTrainer._compute_loss
    _get_last_hidden_state = distillation_trainer.DistillationTrainer._get_last_hidden_state
    _is_vlm = False
    model_kwarg_keys = ()

    def __init__(self, teacher, beta, temperature):
        from trl.models.utils import _ForwardRedirection

        self.teacher_model, self.beta, self.temperature = teacher, beta, temperature
        # is_main_process: TRL's profiling decorator reads it on objects that are not Trainers
        self.accelerator = types.SimpleNamespace(unwrap_model=lambda model: model,
                                                 is_main_process=True)
        self._forward_redirection = _ForwardRedirection()


def test_monkeypatch_reaches_trls_distillation_trainer(monkeypatch):
    assert "_chunked_divergence_loss" in distillation_trainer.DistillationTrainer._compute_loss.__code__.co_names
    student, teacher = tiny_models()
    g = _gen(60)
    inputs = {"prompt_ids": torch.randint(3, 64, (2, 4), generator=g),
              "completion_ids": torch.randint(3, 64, (2, 6), generator=g),
              "prompt_mask": torch.ones(2, 4, dtype=torch.long),
              "completion_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])}
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    trainer = _Trainer(teacher, beta=0.3, temperature=1.5)

    def step():
        loss, entropy, n = trainer._compute_loss(student, inputs, torch.tensor(8.0, device=DEVICE))
        grads = torch.autograd.grad(loss, [student.lm_head.weight, student.model.norm.weight])
        return loss.detach(), entropy, n, grads

    want = step()
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return trl_chunked_divergence_loss(*args, **kwargs)

    monkeypatch.setattr(distillation_trainer, "_chunked_divergence_loss", spy)
    got = step()
    assert len(calls) == 1
    # TRL read the transforms from the configs and handed them to the drop-in
    assert calls[0]["student_logit_scale"] == 0.5 and calls[0]["teacher_final_logit_softcapping"] == 5.0
    torch.testing.assert_close(got[0], want[0], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=2e-5, atol=1e-5)
    assert int(got[2]) == int(want[2]) == 9
    for a, b in zip(got[3], want[3]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * b.abs().max().item())


# ---------------------------------------------------------------------------------------------
# FSDP2's DTensor heads (TRL gathers them once with full_tensor())

_DTENSOR = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    sys.path.insert(0, {tests!r})
    from test_trl_dropin import make_inputs, run, trl_loss
    from pydistill.integrations import trl_chunked_divergence_loss
    dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    inputs = make_inputs(seed=70)
    sharded = dict(inputs)
    for k in ("student_lm_head_weight", "student_lm_head_bias", "teacher_lm_head_weight",
              "teacher_lm_head_bias"):
        sharded[k] = distribute_tensor(inputs[k].detach(), mesh, [Shard(0)]).requires_grad_(
            inputs[k].requires_grad)
    plain = run(trl_chunked_divergence_loss, inputs, 0.5)
    loss, entropy, n = trl_chunked_divergence_loss(**sharded, beta=0.5)
    theirs = trl_loss(**sharded, beta=0.5)[0]
    (g_w,) = torch.autograd.grad(loss * 0.7, [sharded["student_lm_head_weight"]])
    torch.testing.assert_close(loss.detach(), plain[0])
    torch.testing.assert_close(entropy, plain[1])
    torch.testing.assert_close(theirs.detach(), plain[0], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(g_w.full_tensor(), plain[3][1])
    dist.destroy_process_group()
    print("ok")
""")


@pytest.mark.skipif(DEVICE.type != "cpu" or not torch.distributed.is_available(),
                    reason="gloo on the CPU")
def test_dtensor_heads(tmp_path):
    code = _DTENSOR.format(tests=str(Path(__file__).parent), store=str(tmp_path / "store"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent),
                                                         os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]

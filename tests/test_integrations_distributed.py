"""causal_lm_kd_loss (the Trainer integration's loss) under DistributedDataParallel and FSDP2
(``fully_shard``): two processes on the gloo backend, on the CPU, each with half of the batch.
The gradient of one step must equal the single-process gradient of the whole batch (the
token-level mean over both halves), and the loss, summed over ranks, its loss.

All cases run in one spawn of two processes (their start-up is most of the time).
"""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import pydistill as pdl

from conftest import peer

transformers = peer("transformers")

LOSS = dict(temperature=2.0, hard_weight=0.3, soft_weight=0.7, divergence="kl")
WORLD = 2


def tiny_llama(hidden, vocab, seed):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).float()


def full_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (4, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def scored(inputs):
    return int((inputs["labels"][:, 1:] != -100).sum())


def reference(student, teacher, inputs):
    from pydistill.integrations import causal_lm_kd_loss

    loss = causal_lm_kd_loss(student, teacher, inputs, LOSS)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in student.named_parameters()}


def _local(inputs, rank):
    return {k: v[2 * rank:2 * rank + 2] for k, v in inputs.items()}


def _distributed_step(student, teacher, inputs, rank):
    from pydistill.integrations import causal_lm_kd_loss

    local = _local(inputs, rank)
    # Trainer's normalisation: the global count, times the world size (DDP and FSDP average)
    loss = causal_lm_kd_loss(student, teacher, local, LOSS,
                             num_items_in_batch=scored(inputs) / WORLD)
    loss.backward()
    total = loss.detach().clone() / WORLD
    dist.all_reduce(total)
    return total


def _full(x):
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def _check(rank, name, loss, grads, want_loss, want_grads):
    where = f"{name}, rank {rank}"
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6, msg=lambda m: f"{where}, loss: {m}")
    assert set(grads) == set(want_grads), where
    for k, g in grads.items():
        torch.testing.assert_close(_full(g), want_grads[k], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, k=k: f"{where}, grad {k}: {m}")


def _worker(rank, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        inputs = full_batch()
        teacher = tiny_llama(48, 40, 1).eval().requires_grad_(False)
        init = tiny_llama(32, 40, 0).state_dict()

        def fresh():
            m = tiny_llama(32, 40, 0)
            m.load_state_dict(init)
            return m

        want_loss, want_grads = reference(fresh(), teacher, inputs)

        # DistributedDataParallel
        student = fresh()
        ddp = torch.nn.parallel.DistributedDataParallel(student)
        loss = _distributed_step(ddp, teacher, inputs, rank)
        _check(rank, "DDP", loss, {k: p.grad for k, p in student.named_parameters()},
               want_loss, want_grads)

        # FSDP2: every decoder layer, then the root (embeddings, norm, LM head); the teacher
        # unsharded, then sharded the same way
        from torch.distributed.fsdp import fully_shard

        for shard_teacher in (False, True):
            student = fresh()
            for layer in student.model.layers:
                fully_shard(layer)
            fully_shard(student)
            t = teacher
            if shard_teacher:
                t = tiny_llama(48, 40, 1).eval().requires_grad_(False)
                for layer in t.model.layers:
                    fully_shard(layer)
                fully_shard(t)
            loss = _distributed_step(student, t, inputs, rank)
            _check(rank, f"FSDP2 (teacher sharded: {shard_teacher})", loss,
                   {k: p.grad for k, p in student.named_parameters()}, want_loss, want_grads)

        # a head given its own fully_shard is refused with a clear error
        student = fresh()
        fully_shard(student.lm_head)
        fully_shard(student)
        try:
            _distributed_step(student, teacher, inputs, rank)
        except ValueError as e:
            assert "own fully_shard" in str(e), e
        else:
            raise AssertionError("a separately sharded LM head was not refused")
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp2_equal_single_process(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    pytest.importorskip("torch.distributed.fsdp")
    # a failed check in a worker raises here (mp.spawn re-raises it)
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)

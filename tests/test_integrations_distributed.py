"""causal_lm_kd_loss (the Trainer integration's loss) under DistributedDataParallel and FSDP2
(``fully_shard``, the LM head with the root or under its own), a hand-written DDP / FSDP2 loop
calling linear_kd_loss through call_in_forward, and the TRL drop-in with a separately sharded
head: two processes on the gloo backend, on the CPU, each with half of the batch. The gradient
of one step must equal the single-process gradient of the whole batch (the token-level mean
over both halves), and the loss, summed over ranks, its loss.

All cases run in one spawn of two processes (their start-up is most of the time).
"""
import gc

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

        # a head given its own fully_shard: gathered, its gradient averaged back to the shards
        student = fresh()
        for layer in student.model.layers:
            fully_shard(layer)
        fully_shard(student.lm_head)
        fully_shard(student)
        loss = _distributed_step(student, teacher, inputs, rank)
        _check(rank, "FSDP2, head under its own fully_shard", loss,
               {k: p.grad for k, p in student.named_parameters()}, want_loss, want_grads)

        _hand_written_loops(rank, fresh, teacher, inputs, want_loss, want_grads)
        _trl_head_under_its_own_fully_shard(rank, fresh, teacher, inputs)
    finally:
        # no process tears its group down while the other still gathers, and no sharded model
        # outlives the group (gloo aborts the process at exit otherwise)
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def _hand_written_loops(rank, fresh, teacher, inputs, want_loss, want_grads):
    """A training loop that calls pdl.linear_kd_loss itself, on the model's backbone and head
    weight, through call_in_forward: DDP synchronises the gradients and FSDP2 gathers the
    parameters as for model(...). (The same loop on ddp.module, without it, leaves each process
    its own gradient.)"""
    from torch.distributed.fsdp import fully_shard

    from pydistill.integrations import call_in_forward

    local = _local(inputs, rank)
    model_inputs = {k: v for k, v in local.items() if k != "labels"}
    targets = F.pad(local["labels"][:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        h_t = teacher.model(**model_inputs).last_hidden_state
    scale = WORLD / scored(inputs)  # the global token mean, times the processes DDP averages

    def fused(student):
        h_s = student.model(**model_inputs).last_hidden_state
        return pdl.linear_kd_loss(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight,
                                  labels=targets, reduction="sum", **LOSS) * scale

    def total(loss):
        loss = loss.detach().clone() / WORLD
        dist.all_reduce(loss)
        return loss

    student = fresh()
    ddp = torch.nn.parallel.DistributedDataParallel(student)
    loss = call_in_forward(ddp, lambda: fused(student))
    loss.backward()
    _check(rank, "hand-written DDP loop", total(loss),
           {k: p.grad for k, p in student.named_parameters()}, want_loss, want_grads)

    student = fresh()
    for layer in student.model.layers:
        fully_shard(layer)
    fully_shard(student)
    loss = call_in_forward(student, lambda: fused(student))
    loss.backward()
    _check(rank, "hand-written FSDP2 loop", total(loss),
           {k: p.grad for k, p in student.named_parameters()}, want_loss, want_grads)


def _trl_head_under_its_own_fully_shard(rank, fresh, teacher, inputs):
    """TRL's DistillationTrainer path: the last hidden states from the (FSDP2) model's forward,
    then the loss on the LM head's weight, here a DTensor sharded by the head's own fully_shard.
    The head's gradient (and every other) equals the single-process one."""
    from torch.distributed.fsdp import fully_shard

    from pydistill.integrations import call_in_forward, trl_chunked_divergence_loss

    def step(student, batch, num_items):
        model_inputs = {k: v for k, v in batch.items() if k != "labels"}
        mask = F.pad(batch["labels"][:, 1:], (0, 1), value=-100) != -100
        with torch.no_grad():
            h_t = teacher.model(**model_inputs).last_hidden_state
        h_s = call_in_forward(student, lambda: student.model(**model_inputs).last_hidden_state)
        loss, _, _ = trl_chunked_divergence_loss(h_s, h_t, student.lm_head.weight,
                                                 teacher.lm_head.weight, mask, beta=0.3,
                                                 num_items_in_batch=num_items, temperature=1.5)
        loss.backward()
        return {k: p.grad for k, p in student.named_parameters()}

    want = step(fresh(), inputs, scored(inputs))
    student = fresh()
    for layer in student.model.layers:
        fully_shard(layer)
    fully_shard(student.lm_head)
    fully_shard(student)
    got = step(student, _local(inputs, rank), scored(inputs) / WORLD)
    for k, g in got.items():
        torch.testing.assert_close(_full(g), want[k], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, k=k: f"TRL drop-in, rank {rank}, grad {k}: {m}")


def test_ddp_and_fsdp2_equal_single_process(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    pytest.importorskip("torch.distributed.fsdp")
    # a failed check in a worker raises here (mp.spawn re-raises it)
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)

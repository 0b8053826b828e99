"""Offline distillation: store the teacher's top-k log-probabilities, train from the file.

When the teacher is too large to run next to the student, its predictions are computed once
and stored. Storing the full distribution costs V floats per token; the top-k costs 2k
numbers (log-probabilities and token ids). This example (same generated language and models
as ``llm_distill.py``):

1. trains the teacher on the large corpus;
2. dumps, for every token of the student's sequences, the teacher's top-k log-probabilities
   (float16) and ids (int32) to a safetensors file, with the dense float32 log-probabilities'
   size for comparison;
3. trains the same student four ways, same initialisation and batches:
   hard labels only; online KD (teacher hidden states + head, dense, ``linear_kd_loss``);
   offline KD from the file with ``linear_kd_loss(teacher_topk=...)`` (the ``topk_kd_loss``
   math fused with the student's LM head), with ``tail="bucket"`` (the teacher's leftover mass
   1 - sum of the top-k as one more outcome) and with ``tail="renormalize"``.

Run it::

    python -m pydistill.examples.offline_topk            # a few minutes on two CPU cores
    python -m pydistill.examples.offline_topk --quick --k 4 --plot /tmp/offline_topk.png
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

import pydistill
from pydistill.examples import llm_distill as common


def dump_topk(teacher, ids, k: int, path: str, batch: int = 64) -> dict:
    """Write the teacher's top-k next-token log-probs (T = 1) for every position of ``ids``."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        sys.exit('this example needs safetensors: pip install "pydistill-kernels[examples]"')
    logprobs, indices = [], []
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            # the teacher's logits are formed here, once, offline
            lp = torch.log_softmax(teacher(input_ids=ids[i:i + batch]).logits.float(), -1)
            v, j = lp.topk(k, dim=-1)
            logprobs.append(v.half())
            indices.append(j.int())
    tensors = {"logprobs": torch.cat(logprobs), "indices": torch.cat(indices), "input_ids": ids}
    save_file(tensors, path, metadata={"k": str(k), "temperature": "1.0",
                                       "vocab": str(teacher.config.vocab_size)})
    return tensors


def load_topk(path: str):
    from safetensors.torch import load_file
    t = load_file(path)
    return t["input_ids"], t["logprobs"].float(), t["indices"].long()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pydistill.examples.offline_topk",
        description="Store a teacher's top-k log-probs with safetensors, distil a student from "
                    "them with linear_kd_loss(teacher_topk=...) / topk_kd_loss, and compare with "
                    "online KD and hard labels.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--k", type=int, default=16, help="teacher log-probs stored per token")
    p.add_argument("--out", default=None, help="the safetensors file (default: a temporary one)")
    args = p.parse_args(argv)
    common.need_transformers()
    common.setup_threads(args.threads)
    start = time.perf_counter()
    setup = common.make_setup(args)
    s = setup.size
    if not 1 <= args.k <= s["vocab"]:
        p.error(f"--k must be in [1, {s['vocab']}]")

    teacher = common.train_teacher(setup, args)
    teacher_loss = common.heldout_loss(teacher, setup.heldout)

    tmp = None
    path = args.out
    if path is None:
        tmp = tempfile.TemporaryDirectory()
        path = os.path.join(tmp.name, "teacher_topk.safetensors")
    dump_topk(teacher, setup.student_data, args.k, path)
    file_bytes = os.path.getsize(path)
    dense_bytes = setup.student_data.numel() * s["vocab"] * 4
    ids, lp, idx = load_topk(path)
    assert torch.equal(ids, setup.student_data)
    # mass the stored top-k covers, per token (the rest is the bucket / renormalised away)
    covered = lp.exp().sum(-1)[:, :-1].mean().item()

    t_h = common.teacher_hidden(teacher, setup.student_data)
    t_w = teacher.lm_head.weight.detach()
    init, hs, layers = common.student_init(setup, args)
    runs = {
        "hard labels only": lambda m: common.hard_loss_fn(m, ids),
        "online KD (dense teacher)": lambda m: common.kd_loss_fn(
            m, ids, common.kd_objective(args.temperature, args.kd_weight, args.ce_weight), t_h, t_w),
    }
    for tail in ("bucket", "renormalize"):
        def offline(m, tail=tail):
            objective = common.kd_objective(args.temperature, args.kd_weight, args.ce_weight,
                                            tail=tail, teacher_temperature=1.0)
            return common.kd_loss_fn(m, ids, objective, teacher_topk=(lp, idx))
        runs[f"offline top-{args.k}, tail={tail}"] = offline

    curves, rows = {}, [("teacher", common.n_params(teacher), teacher_loss, None)]
    for name, make_loss in runs.items():
        student = common.fresh_student(setup, init, hs, layers)
        curves[name] = common.train_student(setup, args, student, make_loss(student), name)
        rows.append((f"student, {name}", common.n_params(student), curves[name][-1][1],
                     common.best(curves[name])))
    elapsed = time.perf_counter() - start

    print(f"Offline top-k distillation on a generated language (HMM: {s['states']} states, "
          f"vocabulary {s['vocab']}, sequences of {s['length']} tokens)")
    print(f"  teacher  Llama {s['teacher'][1]} layers x {s['teacher'][0]}, {s['teacher_steps']} "
          f"steps on {len(setup.teacher_data)} sequences")
    print(f"  stored   top-{args.k} log-probs (float16) + ids (int32) for "
          f"{setup.student_data.numel()} tokens: {file_bytes / 1024:.1f} KiB "
          f"(dense float32 log-probs: {dense_bytes / 1024:.1f} KiB, x{dense_bytes / file_bytes:.1f}); "
          f"the top-{args.k} hold {covered:.1%} of the teacher's probability on average")
    print(f"  students Llama {layers} layer x {hs}, {s['student_steps']} steps on "
          f"{len(setup.student_data)} sequences, same init and batches; KD = {args.kd_weight:g} "
          f"* T^2 D + {args.ce_weight:g} * CE, T = {args.temperature:g}")
    print()
    common.print_table("Held-out next-token loss (nats/token; lower is better)", rows, setup.oracle)
    hard, hard_best = rows[1][2], rows[1][3][0]
    print()
    for name, _, loss, low in rows[2:]:
        print(f"  {name} - hard-only: {hard - loss:+.4f} nats/token at the end, "
              f"{hard_best - low[0]:+.4f} at each run's best "
              f"({'helps' if low[0] < hard_best else 'does not help'})")
    if args.quick:
        print("(--quick is a smoke test: the teacher is undertrained and the runs short)")
    print(f"({elapsed:.0f} s)")
    plot = common.save_plot(args.plot if args.plot is not None else "offline_topk.png",
                            f"Student held-out loss: offline top-{args.k} vs online KD", curves,
                            setup.oracle)
    if plot:
        print(f"plot: {plot}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

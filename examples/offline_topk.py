"""Offline distillation from a store: capture the teacher once, train the student from the file.

When the teacher is too large to run next to the student, its next-token distributions are
computed once and stored. This example (same generated language and models as
``llm_distill.py``):

1. trains the teacher on the large corpus;
2. captures it over the student's sequences with ``pydistill.offline.capture`` twice, into two
   stores: its top-k log-probabilities (``method="topk"``) and S ids drawn from it per position
   with their counts (``method="sample"``, the unbiased estimate), both at the KD temperature T;
3. reads each store back with ``pydistill.offline.open_store`` and ``OfflineCollator`` (the
   batch carries the stored temperature and method) and trains the same student four ways,
   same initialisation and batches:

       hard labels only
       online KD        teacher hidden states + head, dense (linear_kd_loss)
       offline top-k    linear_offline_kd_loss on the top-k store (tail="bucket": the
                        teacher's leftover mass 1 - sum of the top-k as one more outcome)
       offline sampled  linear_offline_kd_loss on the sampled store: an unbiased estimate of
                        forward KL's gradient (pydistill.sampled_kd_loss)

4. reports every student's held-out next-token loss (nats/token, the hard cross-entropy on
   held-out text, the same measure for every run, whatever its training loss was), and each
   store's bytes per token on disk against dense float32 log-probs.

Run it::

    python -m pydistill.examples.offline_topk            # a few minutes on two CPU cores
    python -m pydistill.examples.offline_topk --quick --k 8 --samples 8 --plot /tmp/offline.png
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


def capture_store(teacher, ids, out: str, *, method: str, k: int, samples, temperature: float):
    """Capture the teacher's next-token distributions over ``ids`` (N, L) into ``out``; returns
    (the store opened, its bytes on disk)."""
    from pydistill.offline import capture, open_store

    batches = [{"input_ids": ids[i:i + 64]} for i in range(0, len(ids), 64)]
    capture(teacher, batches, out, k=k, temperature=temperature, method=method, samples=samples,
            progress=False)
    size = sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(out) for f in files)
    return open_store(out), size


def collated(store, ids) -> dict:
    """The whole store as one collated batch (OfflineCollator: labels, the teacher's (N, L, K)
    ids and log-probs, the stored temperature and method), rows in the order of ``ids``."""
    from pydistill.offline import OfflineCollator

    items = [store[i] for i in range(len(store))]
    batch = OfflineCollator(pad_token_id=0)(items)
    if not torch.equal(batch["input_ids"], ids):
        raise RuntimeError("the store's sequences are not the captured ones, in order")
    return batch


def offline_loss_fn(student, batch: dict, kd_weight: float, ce_weight: float):
    """KD from a stored teacher: the student's hidden states and LM head against the batch's
    teacher rows (linear_offline_kd_loss: the stored temperature, the stored method); logs the
    KD term, the hard CE and their weighted total. Labels: the collator's, shifted inside."""
    def loss_fn(idx):
        part = {k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        h = common.hidden(student, part["input_ids"])
        loss, parts = pydistill.linear_offline_kd_loss(
            h, student.lm_head.weight, part, soft_weight=kd_weight, hard_weight=ce_weight,
            return_components=True)
        return loss, {"kd": parts["kd"], "ce": parts["ce"], "total": loss.detach()}
    return loss_fn


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pydistill.examples.offline_topk",
        description="Capture a teacher into a pydistill.offline store (top-k and sampled), "
                    "distil a student from each store with linear_offline_kd_loss, and compare "
                    "with online KD and hard labels on held-out text.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--k", type=int, default=16, help="top-k entries stored per token")
    p.add_argument("--samples", type=int, default=12,
                   help="ids drawn from the teacher per token for the sampled store")
    p.add_argument("--out", default=None, help="folder for the two stores (default: temporary)")
    args = p.parse_args(argv)
    common.need_transformers()
    common.setup_threads(args.threads)
    start = time.perf_counter()
    setup = common.make_setup(args)
    s = setup.size
    if not 1 <= args.k <= s["vocab"]:
        p.error(f"--k must be in [1, {s['vocab']}]")
    if args.samples < 1:
        p.error("--samples must be >= 1")

    teacher = common.train_teacher(setup, args)
    teacher_loss, teacher_params = common.heldout_loss(teacher, setup.heldout), common.n_params(teacher)

    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    root = args.out if args.out is not None else tmp.name
    ids = setup.student_data
    stores = {}
    for method, k in (("topk", args.k), ("sample", args.samples)):
        store, size = capture_store(teacher, ids, os.path.join(root, method), method=method,
                                    k=k, samples=args.samples if method == "sample" else None,
                                    temperature=args.temperature)
        stores[method] = (collated(store, ids), size, store.manifest)
    tokens = ids.numel()
    dense_bytes = tokens * s["vocab"] * 4

    t_h = common.teacher_hidden(teacher, ids)
    t_w = teacher.lm_head.weight.detach()
    del teacher  # nothing below needs it but the online run's precomputed hidden states
    init, hs, layers = common.student_init(setup, args)
    runs = {
        "hard labels only": lambda m: common.hard_loss_fn(m, ids),
        "online KD (dense teacher)": lambda m: common.kd_loss_fn(
            m, ids, common.kd_objective(args.temperature, args.kd_weight, args.ce_weight), t_h, t_w),
        f"offline top-{args.k} store": lambda m: offline_loss_fn(
            m, stores["topk"][0], args.kd_weight, args.ce_weight),
        f"offline sampled store, S={args.samples}": lambda m: offline_loss_fn(
            m, stores["sample"][0], args.kd_weight, args.ce_weight),
    }

    curves, rows = {}, [("teacher", teacher_params, teacher_loss, None)]
    for name, make_loss in runs.items():
        student = common.fresh_student(setup, init, hs, layers)
        curves[name] = common.train_student(setup, args, student, make_loss(student), name)
        rows.append((f"student, {name}", common.n_params(student), curves[name][-1][1],
                     common.best(curves[name])))
    elapsed = time.perf_counter() - start

    topk_batch = stores["topk"][0]
    counted = topk_batch["labels"][:, 1:] != -100
    covered = topk_batch["teacher_logprobs"][:, :-1].exp().sum(-1)[counted].mean().item()
    print(f"Offline distillation from a store on a generated language (HMM: {s['states']} "
          f"states, vocabulary {s['vocab']}, sequences of {s['length']} tokens)")
    print(f"  teacher  Llama {s['teacher'][1]} layers x {s['teacher'][0]}, {s['teacher_steps']} "
          f"steps on {len(setup.teacher_data)} sequences")
    for method, (_, size, manifest) in stores.items():
        what = (f"top-{manifest['k']} log-probs" if method == "topk"
                else f"{manifest['samples']} draws per token (distinct ids + counts)")
        print(f"  store    {method:<6} {what} at T = {manifest['temperature']:g} for {tokens} "
              f"tokens: {size / tokens:.1f} B/token on disk (dense float32 log-probs: "
              f"{dense_bytes / tokens:.0f} B/token, x{dense_bytes / size:.1f})")
    print(f"  the top-{args.k} hold {covered:.1%} of the teacher's probability on average")
    print(f"  students Llama {layers} layer x {hs}, {s['student_steps']} steps on "
          f"{len(ids)} sequences, same init and batches; KD = {args.kd_weight:g} "
          f"* T^2 D + {args.ce_weight:g} * CE, T = {args.temperature:g}")
    print()
    common.print_table("Held-out next-token loss (nats/token; lower is better)", rows, setup.oracle)
    hard, hard_best = rows[1][2], rows[1][3][0]
    print()
    for name, _, loss, low in rows[2:]:
        print(f"  {name} - hard-only: {hard - loss:+.4f} nats/token at the end, "
              f"{hard_best - low[0]:+.4f} at each run's best "
              f"({'helps' if low[0] < hard_best else 'does not help'})")
    print("  (the held-out loss is the same hard cross-entropy for every run; the sampled run's "
          "training KD term is a cross-entropy estimate, not a KL, and is not compared)")
    if args.quick:
        print("(--quick is a smoke test: the teacher is undertrained and the runs short)")
    print(f"({elapsed:.0f} s)")
    plot = common.save_plot(args.plot if args.plot is not None else "offline_topk.png",
                            f"Student held-out loss: offline stores (top-{args.k}, "
                            f"S={args.samples}) vs online KD", curves, setup.oracle)
    if plot:
        print(f"plot: {plot}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

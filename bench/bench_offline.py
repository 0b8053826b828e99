"""Benchmark of the offline store (``pydistill.offline``): size on disk and reading speed.

For top-64, top-128 and a sampled store (12 draws a position) of a Zipf-like teacher at
V = 151,936 (:func:`zipf_teacher_topk`), written through ``StoreWriter`` (what ``capture`` and
the converters use), each row reports:

* ``bytes_per_token`` / ``bytes_per_entry``: the shard files (input ids, teacher ids and
  log-probs or counts, Parquet metadata) over the stored positions / the positions x K entries
  (top-k stores only);
Rates are tokens per second, the best of ``--reps`` runs, on one torch thread (a DataLoader
worker's setting).

* ``dense_tok_s``: ``open_store(path)`` items read one by one (freshly opened store);
* ``compact_tok_s``: ``open_store(path, compact=True)`` items and ``OfflineCollator``, batches
  of 8 sequences (what a DataLoader worker does);
* ``decode_tok_s``: ``decode(batch, device)`` of those batches (synchronized on CUDA);
* ``step_tok_s``: the training step it feeds, taken as ``linear_kd_loss`` fwd+bwd at N = 8192,
  V = 128,256 on an H100, **predicted** (bench/results/static-sm90.csv); the loss alone is a
  lower bound on a step's time, so the step's token rate is at most this;
* ``decode_share``: step_tok_s / decode_tok_s, the time decode adds to a step (it runs on the
  training stream); ``bottleneck``: ``yes`` when decode adds more than 10 % or when one worker's
  compact reading + collating is slower than the step.

    python -m pydistill.bench.bench_offline --quick --device cpu
"""
import argparse
import csv
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from pydistill.bench import harness
from pydistill.offline import OfflineCollator, StoreWriter, decode, open_store
from pydistill.offline.capture import _sample_counts

VOCAB = 151936
STEP_CASE, STEP_N, STEP_MS = "kl n=8192 v=128256", 8192, 52.0149   # fallback: static-sm90.csv
COLUMNS = ("store", "K", "V", "tokens", "bytes_per_token", "bytes_per_entry", "dense_tok_s",
           "compact_tok_s", "decode_tok_s", "step_tok_s", "decode_share", "bottleneck", "device")


def zipf_teacher_topk(n, vocab, k, seed=0, sharpness=(0.7, 2.5)):
    """Top-k of a Zipf-like teacher: log p_r = -a log r (+ noise on the top k) - logsumexp over
    the ranks r = 1..V, a ~ U[sharpness] per position (by default [0.7, 2.5]: confident and flat
    positions both occur; [2, 4]: a confident teacher, top-1 p ~ 0.8); the k ids drawn without
    replacement with weights r**-0.5 (frequent tokens get small ids in BPE vocabularies).
    Returns log-probs (n, k) float32, sorted decreasing, and ids (n, k) int64."""
    g = torch.Generator().manual_seed(seed)
    a = torch.empty(n, 1, dtype=torch.float64).uniform_(*sharpness, generator=g)
    logr = torch.arange(1, vocab + 1, dtype=torch.float64).log()
    tail = torch.cat([torch.logsumexp(-a[i:i + 64] * logr[k:], -1) for i in range(0, n, 64)])
    top = -a * logr[:k] + 0.3 * torch.randn(n, k, generator=g, dtype=torch.float64)
    lse = torch.logaddexp(torch.logsumexp(top, -1), tail)
    lp = top.sort(dim=-1, descending=True).values - lse[:, None]
    ids = torch.multinomial(logr.mul(-0.5).exp().float().expand(n, vocab), k, replacement=False,
                            generator=g)
    return lp.float(), ids


def write_store(out, k, samples, sequences, length, vocab=VOCAB):
    """A store of `sequences` x `length` positions; sampled stores draw `samples` ids per
    position from the teacher's top 128 (renormalised)."""
    kw = dict(method="sample", samples=samples) if samples else {}
    g = torch.Generator().manual_seed(1)
    with StoreWriter(out, vocab_size=vocab, k=samples or k, **kw) as w:
        for s in range(sequences):
            lp, ids = zipf_teacher_topk(length, vocab, 128 if samples else k, seed=s)
            inputs = torch.randint(0, vocab, (length,), generator=g)
            if not samples:
                w.add(inputs, ids, lp)
                continue
            slot, counts = _sample_counts(lp.double().softmax(-1), samples, g)
            w.add(inputs, torch.where(counts > 0, ids.gather(1, slot), 0), teacher_counts=counts)


def _rate(fn, tokens, reps, device):
    best = float("inf")
    for _ in range(reps):
        harness.synchronize(device)
        t = time.perf_counter()
        fn()
        harness.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return tokens / best


def step_tokens_per_s():
    path = Path(__file__).resolve().parent / "results" / "static-sm90.csv"
    if path.is_file():
        with open(path) as f:
            for r in csv.DictReader(f):
                if (r["family"], r["case"], r["phase"]) == ("linear", STEP_CASE, "fwd+bwd"):
                    return STEP_N / (float(r["predicted_ms"]) / 1e3)
    return STEP_N / (STEP_MS / 1e3)


def measure(name, k, samples, device, *, sequences, length, reps, batch=8, vocab=VOCAB):
    """One row of COLUMNS for a store written into a temporary folder."""
    with tempfile.TemporaryDirectory() as out:
        write_store(out, k, samples, sequences, length, vocab)
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)
                   if f.endswith(".parquet"))
        tokens = sequences * length
        cpu, collate = torch.device("cpu"), OfflineCollator()

        def dense():
            s = open_store(out)
            return [s[i] for i in range(len(s))]

        def compact():
            s = open_store(out, compact=True)
            return [collate([s[j] for j in range(i, min(i + batch, len(s)))])
                    for i in range(0, len(s), batch)]
        batches = compact()
        dense_rate = _rate(dense, tokens, reps, cpu)
        compact_rate = _rate(compact, tokens, reps, cpu)
        decode_rate = _rate(lambda: [decode(b, device) for b in batches], tokens, reps, device)
    step = step_tokens_per_s()
    slow = step / decode_rate > 0.1 or compact_rate < step
    return {"store": name, "K": samples or k, "V": vocab, "tokens": tokens,
            "bytes_per_token": round(size / tokens, 1),
            "bytes_per_entry": "" if samples else round(size / (tokens * k), 3),
            "dense_tok_s": round(dense_rate), "compact_tok_s": round(compact_rate),
            "decode_tok_s": round(decode_rate), "step_tok_s": round(step),
            "decode_share": round(step / decode_rate, 3), "bottleneck": "yes" if slow else "no",
            "device": device.type}


def run(device, *, sequences, length, reps):
    return [measure(name, k, samples, device, sequences=sequences, length=length, reps=reps)
            for name, k, samples in (("top-64", 64, None), ("top-128", 128, None),
                                     ("sampled-12", None, 12))]


def write_results(rows, csv_path, machine, command):
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    lines = ["# Offline store: size on disk and reading speed", "",
             f"Machine: {machine}; torch {torch.__version__}; git {harness.git_revision()}. "
             f"Command: `{command}`.", "",
             "Timings on a shared CPU are noisy (best of the repetitions, one torch thread); "
             f"the step rate is **predicted** (linear_kd_loss fwd+bwd, {STEP_CASE}, H100, "
             "bench/results/static-sm90.csv), not measured. On a CPU run, `decode_tok_s` is the "
             "CPU's (the same torch integer ops run on the GPU with `--device cuda`), so "
             "`decode_share` and `bottleneck` compare it with an H100 step: a pessimistic "
             "stand-in. "
             "Columns: bench/bench_offline.py.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    csv_path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="16 sequences of 512 positions")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--sequences", type=int, default=None)
    p.add_argument("--length", type=int, default=None)
    p.add_argument("--reps", type=int, default=5, help="repetitions; the best is reported")
    p.add_argument("--machine", default=None, help="the machine's name in the .md")
    p.add_argument("--out", type=Path, default=None, help="a .csv file or a folder")
    opts = p.parse_args(argv)
    device = harness.pick_device(opts.device)
    sequences = opts.sequences or (16 if opts.quick else 64)
    length = opts.length or (512 if opts.quick else 1024)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as in a DataLoader worker; the CPU decode is timed on it too
    try:
        rows = run(device, sequences=sequences, length=length, reps=opts.reps)
    finally:
        torch.set_num_threads(threads)
    name = f"offline-{harness.device_slug(device)}{'-quick' if opts.quick else ''}.csv"
    path = harness.output_csv(opts.out, name)
    write_results(rows, path, opts.machine or harness.device_name(device),
                  shlex.join(["python", "-m", "pydistill.bench.bench_offline",
                              *(sys.argv[1:] if argv is None else argv)]))
    for r in rows:
        print(r)
    return rows


if __name__ == "__main__":
    main()

"""MiniLM-style distillation of a BERT teacher into a shallower, narrower BERT, on the CPU.

The models keep their fast attention (``attn_implementation="sdpa"``, which cannot return
attention maps): forward hooks on the last layer's ``query`` / ``key`` / ``value`` Linear
modules capture the projections (B, L, heads * head_dim), and ``pydistill.relation_kd_loss``
compares the teacher's and the student's self-attention relations from them (MiniLMv2, Wang
et al. 2021)::

    for X in (Q, K, V):   split X into R relation heads of width W / R, then per head
        relation_X = softmax(X X^T / sqrt(W / R))          (L x L, masked keys excluded)
    relation loss  = sum over X of  mean over (heads, valid rows) KL(teacher || student)

Teacher and student may differ in width and head count: only R is shared. The L x L
relations are never materialised by pydistill's kernels (its CPU path works in query blocks).

The task is masked-language modelling of a generated language (the hidden Markov model of
``llm_distill.py``: predicting a masked token means inferring the hidden state from both
sides), sequences of random length, right-padded, with an attention mask.

1. A BERT teacher (transformers ``BertConfig``, built from the config: no download) is
   trained with the MLM loss on a large corpus.
2. A student (fewer layers, narrower, fewer heads) sees only a small part of the corpus and
   is trained twice from the same initialisation, on the same batches and masks:

       MLM only:            CE(masked tokens)
       MLM + relations:     CE(masked tokens) + w * relation_kd_loss((Q_s, K_s, V_s), (Q_t, K_t, V_t))

   (MiniLMv2 distils the relations alone, task-agnostically, then fine-tunes; here the two
   are mixed in one run so that both students get the same budget of steps.)
3. Both are evaluated on held-out sequences with fixed masks: MLM loss and accuracy.

Run it (a few minutes on two CPU cores; ``--quick`` is a smoke test of well under a minute)::

    pip install "pydistill-kernels[examples]"      # transformers
    python -m pydistill.examples.minilm
    python -m pydistill.examples.minilm --quick --plot /tmp/minilm.png
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

import pydistill
from pydistill.examples.llm_distill import (
    best, make_language, n_params, need_transformers, sample_corpus, save_plot, setup_threads,
    train,
)

PAD, MASK, SPECIAL = 0, 1, 2  # token ids 0 and 1 are special; the language's tokens follow

SIZES = {
    # teacher / student: (hidden, layers, heads). relation_heads divides both hidden sizes.
    "full": dict(vocab=128, states=16, length=32, teacher=(64, 3, 4), teacher_seqs=4000,
                 teacher_steps=400, student=(32, 1, 2), student_seqs=96, student_steps=200,
                 heldout=256, batch=32, relation_heads=4),
    "quick": dict(vocab=64, states=8, length=16, teacher=(32, 2, 4), teacher_seqs=500,
                  teacher_steps=40, student=(16, 1, 2), student_seqs=32, student_steps=16,
                  heldout=64, batch=16, relation_heads=4),
}


# --------------------------------------------------------------------------------------------
# Data: variable-length sequences of the generated language, right-padded, and MLM masks


def make_corpus(lang, n: int, length: int, seed: int):
    """(ids, attention_mask), both (n, length): lengths uniform in [length / 2, length]."""
    ids = sample_corpus(lang, n, length, seed) + SPECIAL
    g = torch.Generator().manual_seed(seed + 1000)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
    attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return ids.masked_fill(attention_mask == 0, PAD), attention_mask


def mask_tokens(ids, attention_mask, g: torch.Generator, rate: float = 0.15):
    """(inputs, labels): a ``rate`` of the real tokens replaced by [MASK] (always at least one
    per sequence); labels are the original ids there and -100 elsewhere."""
    real = attention_mask.bool()
    scores = torch.rand(ids.shape, generator=g).masked_fill(~real, 2.0)
    chosen = (scores < rate) & real
    chosen[torch.arange(len(ids)), scores.argmin(1)] = True  # the lowest score is a real token
    return ids.masked_fill(chosen, MASK), ids.masked_fill(~chosen, -100)


# --------------------------------------------------------------------------------------------
# Models, the Q/K/V hooks, the losses


def bert(vocab: int, size, length: int, seed: int):
    transformers = need_transformers()
    hidden, layers, heads = size
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=vocab + SPECIAL, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=length,
        pad_token_id=PAD, attn_implementation="sdpa")
    return transformers.BertForMaskedLM(config)


class CaptureQKV:
    """Forward hooks on the query / key / value Linear modules of one self-attention block:
    after each forward, ``.qkv`` holds their outputs (B, L, heads * head_dim). The attention
    itself is untouched (SDPA); nothing of size L x L is ever kept."""

    def __init__(self, attention):
        self.outputs = {}
        self.handles = [getattr(attention, name).register_forward_hook(self._hook(name))
                        for name in ("query", "key", "value")]

    def _hook(self, name):
        def hook(module, inputs, output):
            self.outputs[name] = output
        return hook

    @property
    def qkv(self):
        return tuple(self.outputs[name] for name in ("query", "key", "value"))

    def remove(self):
        for h in self.handles:
            h.remove()


def last_self_attention(model):
    return model.bert.encoder.layer[-1].attention.self


def mlm_loss_fn(model, ids, attention_mask, seed: int, teacher=None, relation_weight=0.0,
                relation_heads: int = 4):
    """``loss_fn(idx) -> (loss, logs)`` for ``train``: the MLM loss, plus (with a teacher)
    ``relation_weight`` times the MiniLMv2 Q-Q / K-K / V-V relation loss of the last layers.
    The masks come from a generator seeded with ``seed``: two runs see the same masks."""
    g = torch.Generator().manual_seed(seed)
    student_qkv = CaptureQKV(last_self_attention(model)) if teacher is not None else None
    teacher_qkv = CaptureQKV(last_self_attention(teacher)) if teacher is not None else None

    def loss_fn(idx):
        x, am = ids[idx], attention_mask[idx]
        inputs, labels = mask_tokens(x, am, g)
        mlm = model(input_ids=inputs, attention_mask=am, labels=labels).loss
        logs = {"mlm": mlm.detach()}
        if teacher is None:
            return mlm, logs
        with torch.no_grad():
            teacher(input_ids=inputs, attention_mask=am)
        relation = pydistill.relation_kd_loss(
            student_qkv.qkv, teacher_qkv.qkv, num_relation_heads=relation_heads,
            attention_mask=am)
        logs["relation"] = relation.detach()
        return mlm + relation_weight * relation, logs

    return loss_fn


@torch.no_grad()
def evaluate(model, heldout, teacher_qkv=None, relation_heads: int = 4):
    """Held-out MLM loss (nats per masked token) and accuracy with fixed masks, and (given the
    teacher's Q/K/V on the same inputs) the relation loss against the teacher."""
    inputs, attention_mask, labels = heldout
    was_training = model.training
    model.eval()
    capture = CaptureQKV(last_self_attention(model))
    logits = model(input_ids=inputs, attention_mask=attention_mask).logits
    capture.remove()
    model.train(was_training)
    scored = labels != -100
    loss = F.cross_entropy(logits[scored], labels[scored]).item()
    accuracy = (logits[scored].argmax(-1) == labels[scored]).float().mean().item()
    relation = math.nan
    if teacher_qkv is not None:
        relation = pydistill.relation_kd_loss(capture.qkv, teacher_qkv, num_relation_heads=relation_heads,
                                              attention_mask=attention_mask).item()
    return loss, accuracy, relation


# --------------------------------------------------------------------------------------------


def run(args):
    s = SIZES["quick" if args.quick else "full"]
    lang = make_language(s["vocab"], s["states"], args.seed)
    ids, am = make_corpus(lang, s["teacher_seqs"], s["length"], args.seed + 1)
    student_ids, student_am = ids[:s["student_seqs"]], am[:s["student_seqs"]]
    h_ids, h_am = make_corpus(lang, s["heldout"], s["length"], args.seed + 2)
    h_inputs, h_labels = mask_tokens(h_ids, h_am, torch.Generator().manual_seed(args.seed + 3))
    heldout = (h_inputs, h_am, h_labels)

    teacher = bert(s["vocab"], s["teacher"], s["length"], args.seed + 10)
    train(teacher, len(ids), mlm_loss_fn(teacher, ids, am, args.seed + 11),
          steps=s["teacher_steps"], batch=s["batch"], lr=3e-3, seed=args.seed + 12, desc="teacher")
    teacher.eval().requires_grad_(False)
    with torch.no_grad():
        capture = CaptureQKV(last_self_attention(teacher))
        teacher(input_ids=h_inputs, attention_mask=h_am)
        capture.remove()
    teacher_qkv = capture.qkv
    rows = [("teacher", n_params(teacher), *evaluate(teacher, heldout)[:2], None)]

    init = bert(s["vocab"], s["student"], s["length"], args.seed + 20).state_dict()
    every = max(1, s["student_steps"] // 8)
    curves = {}
    for name, teacher_arg in (("student, MLM only", None), ("student, MLM + relations", teacher)):
        student = bert(s["vocab"], s["student"], s["length"], 0)
        student.load_state_dict(init)
        loss_fn = mlm_loss_fn(student, student_ids, student_am, args.seed + 30, teacher=teacher_arg,
                              relation_weight=args.relation_weight,
                              relation_heads=s["relation_heads"])
        at_start = evaluate(student, heldout, teacher_qkv, s["relation_heads"])
        trace = []  # (MLM loss, accuracy, relation loss) at every evaluation

        def evaluate_and_log(student=student, trace=trace):
            trace.append(evaluate(student, heldout, teacher_qkv, s["relation_heads"]))
            return trace[-1][0]

        curve = train(student, len(student_ids), loss_fn, steps=s["student_steps"],
                      batch=min(s["batch"], len(student_ids)), lr=args.student_lr,
                      seed=args.seed + 31, eval_fn=evaluate_and_log, eval_every=every, desc=name)
        curves[name] = [(0, at_start)] + [(step, t) for (step, _), t in zip(curve, trace)]
        rows.append((name, n_params(student), *trace[-1][:2], best(curve)))
    return s, rows, curves


def print_report(s, rows, curves, elapsed, args):
    th, tl, tn = s["teacher"]
    sh, sl, sn = s["student"]
    print(f"MiniLM-style distillation (MLM on a generated language: HMM with {s['states']} states, "
          f"vocabulary {s['vocab']}, sequences of {s['length'] // 2}-{s['length']} tokens, padded)")
    print(f"  teacher  BERT {tl} layers x {th} ({tn} heads), {s['teacher_steps']} steps on "
          f"{s['teacher_seqs']} sequences")
    print(f"  students BERT {sl} layer x {sh} ({sn} heads), {s['student_steps']} steps on "
          f"{s['student_seqs']} sequences (a part of the teacher's), same init, batches and masks")
    print(f"  relations: MiniLMv2 Q-Q + K-K + V-V of the last layers, {s['relation_heads']} relation "
          f"heads, weight {args.relation_weight:g} (pydistill.relation_kd_loss; SDPA attention)")
    print()
    print("Held-out MLM loss and relation loss (to the teacher's) along the student runs")
    (n1, c1), (n2, c2) = curves.items()
    print(f"  {'step':>6}   {'MLM only: MLM':>14} {'relations':>10}   {'MLM + relations: MLM':>21} "
          f"{'relations':>10}")
    for (step, a), (_, b) in zip(c1, c2):
        print(f"  {step:>6}   {a[0]:>14.4f} {a[2]:>10.4f}   {b[0]:>21.4f} {b[2]:>10.4f}")
    print()
    print("Held-out masked-token prediction (lower loss / higher accuracy is better)")
    print(f"  {'model':<28} {'params':>8} {'MLM loss':>9} {'accuracy':>9} {'best loss (step)':>17}")
    for name, params, loss, acc, low in rows:
        b = f"{low[0]:.4f} ({low[1]})" if low else ""
        print(f"  {name:<28} {params:>8,} {loss:>9.4f} {acc:>9.3f} {b:>17}")
    gain = rows[1][2] - rows[2][2]
    gain_best = rows[1][4][0] - rows[2][4][0]
    print()
    verdict = ("no clear difference" if abs(gain_best) < 0.01 else
               "distillation helps" if gain_best > 0 else "distillation does not help")
    print(f"relations - MLM only: {gain:+.4f} nats/token at the end, {gain_best:+.4f} at each "
          f"run's best ({verdict} here; {elapsed:.0f} s)")
    if args.quick:
        print("(--quick is a smoke test: the teacher is undertrained and the runs short)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pydistill.examples.minilm",
        description="Distil a BERT teacher into a smaller BERT with MiniLMv2 self-attention "
                    "relations captured by hooks (SDPA kept); compare with MLM alone.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small configuration (a smoke test)")
    p.add_argument("--seed", type=int, default=0, help="language, data and model seed")
    p.add_argument("--relation-weight", type=float, default=1.0,
                   help="weight of the relation loss next to the MLM loss")
    p.add_argument("--student-lr", type=float, default=1e-2)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--plot", default=None, help="where to save the plot (PNG); '' for none")
    args = p.parse_args(argv)
    need_transformers()
    setup_threads(args.threads)
    start = time.perf_counter()
    s, rows, curves = run(args)
    print_report(s, rows, curves, time.perf_counter() - start, args)
    plot = save_plot(args.plot if args.plot is not None else "minilm.png",
                     "Student held-out MLM loss: MLM alone vs MLM + relations",
                     {name: [(step, r[0]) for step, r in curve] for name, curve in curves.items()},
                     ylabel="held-out MLM loss (nats/masked token)")
    if plot:
        print(f"plot: {plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""LLM distillation on the CPU: a small Llama teacher, a smaller student, linear_kd_loss.

The language is generated: a hidden Markov model (S hidden states, each with a few likely
successors, each emitting a sparse Zipf-like set of tokens that overlaps with other
states' sets). Predicting the next token well means inferring the hidden state from the
context, and the best achievable loss is known exactly (the forward algorithm: the "oracle"
row of the table).

1. A Llama-style teacher (transformers ``LlamaConfig``) is trained on a large corpus.
2. A smaller student sees only a small part of it (``--student-seqs`` sequences, several
   epochs) and is trained twice from the same initialisation, on the same batches:

       hard-only:  CE(student logits, next token)
       KD:         LinearKDLoss(temperature=T, soft_weight=w_kd, hard_weight=w_ce,
                                return_components=True)    # w_kd T^2 KL + w_ce CE, fused

   ``linear_kd_loss`` gets the student's last hidden states and LM-head weight and the
   teacher's (precomputed) hidden states and head: neither model's logits are formed, and the
   two terms it logs (``kd``, ``ce``) come from the same fused pass (``return_components``).
3. Both students are evaluated on held-out sequences: loss (nats/token) and perplexity.

Run it (a few minutes on two CPU cores; ``--quick``: well under a minute)::

    pip install "pydistill-kernels[examples]"      # transformers, safetensors, tqdm, matplotlib
    python -m pydistill.examples.llm_distill
    python -m pydistill.examples.llm_distill --quick --plot /tmp/llm_distill.png

``offline_topk.py`` and ``teacher_assistant.py`` reuse the language, models and loops here.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import pydistill

try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are optional
    def tqdm(iterable=None, **_kwargs):
        return iterable


def need_transformers():
    try:
        import transformers
    except ImportError:
        sys.exit('this example needs transformers: pip install "pydistill-kernels[examples]"')
    return transformers


# --------------------------------------------------------------------------------------------
# The generated language


@dataclass
class Language:
    init: torch.Tensor   # (S,) initial state distribution
    trans: torch.Tensor  # (S, S) transition matrix, rows sum to 1
    emit: torch.Tensor   # (S, V) emission matrix, rows sum to 1


def make_language(vocab: int, states: int, seed: int, successors: int = 3,
                  tokens_per_state: int = 12) -> Language:
    """A random sparse HMM: each state moves to ``successors`` states and emits one of
    ``tokens_per_state`` tokens (Dirichlet-drawn weights, so some are much likelier)."""
    rng = np.random.default_rng(seed)
    trans = np.zeros((states, states))
    emit = np.zeros((states, vocab))
    for s in range(states):
        trans[s, rng.choice(states, successors, replace=False)] = rng.dirichlet([1.0] * successors)
        emit[s, rng.choice(vocab, tokens_per_state, replace=False)] = rng.dirichlet(
            [0.3] * tokens_per_state)
    trans, emit = torch.from_numpy(trans), torch.from_numpy(emit)
    init = torch.full((states,), 1.0 / states, dtype=torch.float64)
    return Language(init, trans, emit)


def sample_corpus(lang: Language, n: int, length: int, seed: int) -> torch.Tensor:
    """(n, length) int64 token ids."""
    g = torch.Generator().manual_seed(seed)
    state = torch.multinomial(lang.init.expand(n, -1), 1, generator=g).squeeze(1)
    out = torch.empty(n, length, dtype=torch.int64)
    for j in range(length):
        out[:, j] = torch.multinomial(lang.emit[state], 1, generator=g).squeeze(1)
        state = torch.multinomial(lang.trans[state], 1, generator=g).squeeze(1)
    return out


def oracle_loss(lang: Language, seqs: torch.Tensor) -> float:
    """The Bayes-optimal next-token loss (nats/token) over positions 1..L-1 (the forward
    algorithm: p(x_{j+1} | x_{<=j}) from the filtered state distribution)."""
    belief = lang.init.expand(seqs.shape[0], -1)  # p(state_j | x_<j)
    total, count = 0.0, 0
    for j in range(seqs.shape[1]):
        like = lang.emit[:, seqs[:, j]].T  # (n, S)
        if j > 0:
            total += -(belief * like).sum(1).log().sum().item()
            count += seqs.shape[0]
        post = belief * like
        belief = (post / post.sum(1, keepdim=True)) @ lang.trans
    return total / count


# --------------------------------------------------------------------------------------------
# Models and loops


def llama(vocab: int, hidden: int, layers: int, length: int, seed: int, heads: int = 4):
    transformers = need_transformers()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=length, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def shifted(ids: torch.Tensor) -> torch.Tensor:
    """Targets aligned with the hidden states: position j predicts token j + 1."""
    return F.pad(ids[:, 1:], (0, 1), value=-100)


def hidden(model, ids):
    return model.model(input_ids=ids).last_hidden_state


@torch.no_grad()
def teacher_hidden(model, ids, batch: int = 64) -> torch.Tensor:
    model.eval()
    return torch.cat([hidden(model, ids[i:i + batch]) for i in range(0, len(ids), batch)])


@torch.no_grad()
def heldout_loss(model, ids, batch: int = 64) -> float:
    """Mean next-token cross-entropy (nats/token) over positions 1..L-1."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(ids), batch):
        x = ids[i:i + batch]
        logits = model(input_ids=x).logits[:, :-1]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += x[:, 1:].numel()
    model.train()
    return total / count


def train(model, n_rows: int, loss_fn, *, steps: int, batch: int, lr: float, seed: int,
          eval_fn=None, eval_every: int = 0, desc: str = ""):
    """AdamW with linear warm-up and cosine decay over random mini-batches of row indices;
    ``loss_fn(idx)`` returns (loss, logs). The batch order depends only on ``seed``, so two
    runs with one seed see the same batches. Returns [(step, eval_fn())] every ``eval_every``."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    curve = []
    order = torch.empty(0, dtype=torch.int64)
    model.train()
    bar = tqdm(range(steps), desc=desc, leave=False)
    for step in bar:
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(n_rows, generator=g)])
        idx, order = order[:batch], order[batch:]
        loss, logs = loss_fn(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if eval_fn is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            curve.append((step + 1, eval_fn()))
        if hasattr(bar, "set_postfix") and step % 10 == 0:
            bar.set_postfix({k: f"{float(v):.3f}" for k, v in logs.items()})
    return curve


def hard_loss_fn(model, ids):
    """Hard labels only: the model's own causal-LM loss."""
    def loss_fn(idx):
        loss = model(input_ids=ids[idx], labels=ids[idx]).loss
        return loss, {"ce": loss.detach()}
    return loss_fn


def hard_ce(logits, targets):
    return F.cross_entropy(logits, targets, ignore_index=-100)


def kd_objective(temperature: float, kd_weight: float, ce_weight: float, **kd_options):
    """The student's objective, one fused call: ``kd_weight * T^2 KL + ce_weight * CE`` from the
    student's hidden states and LM head, the two terms returned beside the loss for logging
    (``return_components``), so the student's (N, V) logits are never formed either."""
    return pydistill.LinearKDLoss(temperature=temperature, soft_weight=kd_weight,
                                  hard_weight=ce_weight, return_components=True, **kd_options)


def kd_loss_fn(student, ids, objective, teacher_h=None, teacher_w=None, teacher_topk=None):
    """KD from precomputed teacher hidden states + head (online) or from a stored top-k
    teacher: ``linear_kd_loss`` on the student's hidden states and LM head; logs the KD term,
    the hard CE and their weighted total."""
    targets = shifted(ids)

    def loss_fn(idx):
        h = hidden(student, ids[idx])
        y = targets[idx]
        if teacher_topk is not None:
            teacher = dict(teacher_topk=(teacher_topk[0][idx], teacher_topk[1][idx]))
        else:
            teacher = dict(teacher_hidden=teacher_h[idx], teacher_weight=teacher_w)
        loss, parts = objective(h, student.lm_head.weight, labels=y, **teacher)
        return loss, {"kd": parts["kd"], "ce": parts["ce"], "total": loss.detach()}
    return loss_fn


def setup_threads(threads: int):
    # The models are small: extra intra-op threads mostly add wake-up latency on a busy machine.
    torch.set_num_threads(threads)


def save_plot(path, title, curves, baseline=None, ylabel="held-out loss (nats/token)"):
    """Held-out loss against step, one line per run; skipped without matplotlib."""
    if not path:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot; pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, curve in curves.items():
        if curve:
            ax.plot([s for s, _ in curve], [v for _, v in curve], marker=".", label=name)
    if baseline is not None:
        ax.axhline(baseline, color="gray", ls="--", lw=1, label="oracle (the HMM itself)")
    ax.set_xlabel("student step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Configuration shared by the three LLM examples


SIZES = {
    # name: (vocab, states, length, teacher (hidden, layers), teacher steps, student seqs,
    #        student steps, heldout seqs)
    "full": dict(vocab=256, states=32, length=48, teacher=(96, 3), teacher_seqs=6000,
                 teacher_steps=400, student_seqs=96, student_steps=200, heldout=256, batch=32),
    "quick": dict(vocab=128, states=16, length=32, teacher=(32, 2), teacher_seqs=1000,
                  teacher_steps=80, student_seqs=48, student_steps=30, heldout=64, batch=16),
}


def add_common_args(p: argparse.ArgumentParser):
    p.add_argument("--quick", action="store_true", help="a small configuration (< 1 minute)")
    p.add_argument("--seed", type=int, default=0, help="language, data and model seed")
    p.add_argument("--student-hidden", type=int, default=None,
                   help="student width (default 24, --quick 16)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="T of the KD term (1: match the teacher's next-token distribution)")
    p.add_argument("--kd-weight", type=float, default=0.9, help="weight of T^2 KL")
    p.add_argument("--ce-weight", type=float, default=0.1, help="weight of the hard CE")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--plot", default=None, help="where to save the plot (PNG); '' for none")


@dataclass
class Setup:
    lang: Language
    size: dict
    teacher_data: torch.Tensor
    student_data: torch.Tensor
    heldout: torch.Tensor
    oracle: float


def make_setup(args) -> Setup:
    size = SIZES["quick" if args.quick else "full"]
    lang = make_language(size["vocab"], size["states"], args.seed)
    teacher_data = sample_corpus(lang, size["teacher_seqs"], size["length"], args.seed + 1)
    student_data = teacher_data[:size["student_seqs"]]  # a small part of the teacher's corpus
    heldout = sample_corpus(lang, size["heldout"], size["length"], args.seed + 2)
    return Setup(lang, size, teacher_data, student_data, heldout, oracle_loss(lang, heldout))


def train_teacher(setup: Setup, args, hidden_size=None, layers=None, desc="teacher"):
    s = setup.size
    hidden_size, layers = hidden_size or s["teacher"][0], layers or s["teacher"][1]
    model = llama(s["vocab"], hidden_size, layers, s["length"], args.seed + 10)
    train(model, len(setup.teacher_data), hard_loss_fn(model, setup.teacher_data),
          steps=s["teacher_steps"], batch=s["batch"], lr=3e-3, seed=args.seed + 11, desc=desc)
    return model.eval()


def student_init(setup: Setup, args, hidden_size=None, layers=1):
    hidden_size = hidden_size or args.student_hidden or (16 if args.quick else 24)
    return llama(setup.size["vocab"], hidden_size, layers, setup.size["length"], args.seed + 20,
                 heads=2).state_dict(), hidden_size, layers


def fresh_student(setup, init, hidden_size, layers):
    model = llama(setup.size["vocab"], hidden_size, layers, setup.size["length"], 0, heads=2)
    model.load_state_dict(init)
    return model


def train_student(setup: Setup, args, model, loss_fn, desc):
    s = setup.size
    every = max(1, s["student_steps"] // 10)
    return train(model, len(setup.student_data), loss_fn, steps=s["student_steps"],
                 batch=min(s["batch"], len(setup.student_data)), lr=1e-2, seed=args.seed + 30,
                 eval_fn=lambda: heldout_loss(model, setup.heldout), eval_every=every, desc=desc)


def best(curve):
    """(loss, step) of the lowest held-out loss along a run (what early stopping would keep)."""
    step, loss = min(curve, key=lambda sv: sv[1])
    return loss, step


def print_table(title, rows, oracle):
    """rows: (name, params, held-out loss at the end, (best loss, its step) or None)."""
    print(title)
    print(f"  {'model':<44} {'params':>8} {'final loss':>11} {'perplexity':>11} {'- oracle':>9}"
          f" {'best (step)':>15}")
    for name, params, loss, low in rows:
        b = f"{low[0]:.4f} ({low[1]})" if low else ""
        print(f"  {name:<44} {params:>8,} {loss:>11.4f} {math.exp(loss):>11.2f} "
              f"{loss - oracle:>+9.4f} {b:>15}")
    print(f"  {'oracle (the HMM, forward algorithm)':<44} {'':>8} {oracle:>11.4f} "
          f"{math.exp(oracle):>11.2f}")
    print("  (final: after the last step; best: the lowest held-out loss measured along the run,"
          " i.e. with early stopping)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pydistill.examples.llm_distill",
        description="Distil a small Llama teacher into a smaller student with linear_kd_loss "
                    "on a generated language; compare with hard labels only.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p)
    args = p.parse_args(argv)
    need_transformers()
    setup_threads(args.threads)
    start = time.perf_counter()
    setup = make_setup(args)
    s = setup.size

    teacher = train_teacher(setup, args)
    teacher_loss = heldout_loss(teacher, setup.heldout)
    t_h = teacher_hidden(teacher, setup.student_data)
    t_w = teacher.lm_head.weight.detach()

    init, hs, layers = student_init(setup, args)
    curves, rows = {}, []
    student = fresh_student(setup, init, hs, layers)
    curves["hard-only"] = train_student(setup, args, student, hard_loss_fn(student, setup.student_data),
                                        "student hard-only")
    rows.append(("student, hard labels only", n_params(student), curves["hard-only"][-1][1],
                 best(curves["hard-only"])))

    student = fresh_student(setup, init, hs, layers)
    objective = kd_objective(args.temperature, args.kd_weight, args.ce_weight)
    curves["KD (linear_kd_loss)"] = train_student(
        setup, args, student, kd_loss_fn(student, setup.student_data, objective, t_h, t_w),
        "student KD")
    kd_curve = curves["KD (linear_kd_loss)"]
    rows.append(("student, KD (linear_kd_loss)", n_params(student), kd_curve[-1][1], best(kd_curve)))
    elapsed = time.perf_counter() - start

    print(f"LLM distillation on a generated language (HMM: {s['states']} states, vocabulary "
          f"{s['vocab']}, sequences of {s['length']} tokens)")
    print(f"  teacher  Llama {s['teacher'][1]} layers x {s['teacher'][0]}, "
          f"{s['teacher_steps']} steps on {len(setup.teacher_data)} sequences")
    print(f"  students Llama {layers} layer x {hs}, {s['student_steps']} steps on "
          f"{len(setup.student_data)} sequences (a part of the teacher's), same init and batches")
    print(f"  KD       {args.kd_weight:g} * T^2 KL (linear_kd_loss, T = {args.temperature:g}) + "
          f"{args.ce_weight:g} * CE; held-out: {len(setup.heldout)} new sequences")
    print()
    rows.insert(0, ("teacher", n_params(teacher), teacher_loss, None))
    print_table("Held-out next-token loss (nats/token; lower is better)", rows, setup.oracle)
    gain, gain_best = rows[1][2] - rows[2][2], rows[1][3][0] - rows[2][3][0]
    print()
    print(f"KD - hard-only: {gain:+.4f} nats/token at the end, {gain_best:+.4f} at each run's best "
          f"({'KD helps' if gain_best > 0 else 'KD does not help'} here; {elapsed:.0f} s).")
    if args.quick:
        print("(--quick is a smoke test: the teacher is undertrained and the runs short; "
              "the full run is the comparison)")
    plot = save_plot(args.plot if args.plot is not None else "llm_distill.png",
                     "Student held-out loss: hard labels vs KD", curves, setup.oracle)
    if plot:
        print(f"plot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

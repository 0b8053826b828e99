"""Cross-tokenizer distillation: a teacher and a student that tokenize the same text differently,
distilled with ULD (``uld_loss``) on positions aligned by character offsets.

The language is ``llm_distill.py``'s hidden Markov model, written out as text: each of its
symbols is a word (a short random letter string), a sequence is its words joined by spaces and
ended with a full stop. Two tokenizers are trained here on the text (Hugging Face
``tokenizers``, no download):

- the teacher's: byte-level BPE (GPT-2 style) with a larger vocabulary, mostly whole words;
- the student's: BPE over Metaspace pre-tokens (SentencePiece style) with a small vocabulary,
  which splits most words into pieces.

Their vocabularies differ in size and meaning, so ``kd_loss`` cannot compare the two models'
distributions; ULD compares their sorted probability vectors instead.

1. A Llama-style teacher is trained on a large corpus in its own tokenization.
2. The student's sequences are tokenized both ways; ``pydistill.alignment.align_batch`` maps
   each student position to the teacher position whose token ends at the same character (both
   then predict what follows the same text), and ``gather_rows`` picks those teacher logits.
3. The student sees only a small part of the corpus and is trained twice from the same
   initialisation, on the same batches:

       hard-only:  CE(student logits, next token)
       ULD:        CE + w * uld_loss(student logits, aligned teacher logits,
                                      top_k=K, labels=aligned positions only)

4. Both are evaluated on held-out text: nats per student token (the two students' common
   unit) and nats per character (comparable with the teacher and with the HMM itself, the
   "oracle": its forward-algorithm loss on the same characters, a lower bound in expectation).

Run it (a few minutes on two CPU cores; ``--quick``: well under a minute)::

    pip install "pydistill-kernels[examples]"      # transformers (and tokenizers), matplotlib
    python -m pydistill.examples.cross_tokenizer
    python -m pydistill.examples.cross_tokenizer --quick --plot /tmp/cross_tokenizer.png
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F

import pydistill
from pydistill import alignment
from pydistill.examples import llm_distill as common

SIZES = {
    # words: the HMM's symbols; length: words per sequence
    "full": dict(words=256, states=32, length=32, teacher=(96, 3), teacher_seqs=6000,
                 teacher_steps=400, student_seqs=96, student_steps=200, heldout=256, batch=32,
                 teacher_vocab=640, student_vocab=96),
    "quick": dict(words=128, states=16, length=16, teacher=(32, 2), teacher_seqs=1000,
                  teacher_steps=80, student_seqs=48, student_steps=30, heldout=64, batch=16,
                  teacher_vocab=384, student_vocab=64),
}
LETTERS = "abcdefghiklmnoprstu"


def need_tokenizers():
    try:
        import tokenizers
    except ImportError:
        sys.exit('this example needs tokenizers: pip install "pydistill-kernels[examples]"')
    return tokenizers


# --------------------------------------------------------------------------------------------
# The language as text, and two tokenizers of it


def make_words(n: int, seed: int) -> List[str]:
    """n distinct random letter strings of 1 to 6 letters: the HMM's symbols as words."""
    g = torch.Generator().manual_seed(seed)
    words: List[str] = []
    while len(words) < n:
        size = int(torch.randint(1, 7, (), generator=g))
        word = "".join(LETTERS[int(i)] for i in torch.randint(0, len(LETTERS), (size,), generator=g))
        if word not in words:
            words.append(word)
    return words


def to_text(seqs: torch.Tensor, words: List[str]) -> List[str]:
    return [" ".join(words[int(i)] for i in seq) + "." for seq in seqs]


def train_tokenizer(texts: List[str], vocab_size: int, byte_level: bool):
    tokenizers = need_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = []
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=alphabet, special_tokens=["<pad>"],
        show_progress=False))
    return tok


@dataclass
class Encoded:
    """A corpus in one tokenization: ids (N, L) right-padded with <pad>, the number of real
    tokens per sequence, each token's character offsets, and the next-token targets (-100 at
    the last real token and on padding)."""
    ids: torch.Tensor
    lengths: torch.Tensor
    offsets: list
    targets: torch.Tensor


def encode(tok, texts: List[str]) -> Encoded:
    encs = tok.encode_batch(texts)
    lengths = torch.tensor([len(e.ids) for e in encs])
    ids = torch.full((len(texts), int(lengths.max())), tok.token_to_id("<pad>"), dtype=torch.int64)
    for b, e in enumerate(encs):
        ids[b, :len(e.ids)] = torch.tensor(e.ids)
    positions = torch.arange(ids.shape[1])
    targets = torch.where(positions[None, :-1] < lengths[:, None] - 1, ids[:, 1:], -100)
    targets = F.pad(targets, (0, 1), value=-100)
    return Encoded(ids, lengths, [e.offsets for e in encs], targets)


# --------------------------------------------------------------------------------------------
# Losses and evaluation


def token_nll(model, data: Encoded, batch: int = 64) -> torch.Tensor:
    """(N, L) next-token losses (nats), 0 where there is no target."""
    out = []
    with torch.no_grad():
        for i in range(0, len(data.ids), batch):
            logits = model(input_ids=data.ids[i:i + batch]).logits.float()
            y = data.targets[i:i + batch]
            out.append(F.cross_entropy(logits.transpose(1, 2), y, ignore_index=-100,
                                       reduction="none"))
    return torch.cat(out)


def first_word_mask(data: Encoded, texts: List[str]) -> torch.Tensor:
    """(N, L) True at the positions whose target starts after the first word: the characters
    every model (and the HMM) is scored on."""
    mask = torch.zeros(data.targets.shape, dtype=torch.bool)
    for b, (offsets, text) in enumerate(zip(data.offsets, texts)):
        first = len(text.split(" ")[0])
        for i in range(len(offsets) - 1):
            mask[b, i] = offsets[i + 1][0] >= first
    return mask


def evaluate(model, data: Encoded, texts: List[str]):
    """(nats per token over all targets, nats per character after each text's first word)."""
    model.eval()
    nll = token_nll(model, data)
    model.train()
    per_token = float(nll.sum() / (data.targets != -100).sum())
    chars = sum(len(t) - len(t.split(" ")[0]) for t in texts)
    per_char = float((nll * first_word_mask(data, texts)).sum()) / chars
    return per_token, per_char


def oracle_per_char(lang, seqs: torch.Tensor, texts: List[str]) -> float:
    """The HMM's own loss on words 2..L (the full stop is certain), per character of the text
    after the first word."""
    total = common.oracle_loss(lang, seqs) * seqs.shape[0] * (seqs.shape[1] - 1)
    return total / sum(len(t) - len(t.split(" ")[0]) for t in texts)


def hard_loss_fn(model, data: Encoded):
    def loss_fn(idx):
        logits = model(input_ids=data.ids[idx]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), data.targets[idx].flatten(), ignore_index=-100)
        return loss, {"ce": loss.detach()}
    return loss_fn


def uld_loss_fn(model, data: Encoded, teacher_rows: torch.Tensor, uld_labels: torch.Tensor,
                objective):
    """CE + w * ULD: the student's logits at every position, the teacher's gathered onto the
    aligned student positions (the others ignored)."""
    def loss_fn(idx):
        logits = model(input_ids=data.ids[idx]).logits
        return objective(uld=dict(student_logits=logits, teacher_logits=teacher_rows[idx],
                                  labels=uld_labels[idx]),
                         ce=(logits.flatten(0, 1), data.targets[idx].flatten()))
    return loss_fn


def aligned_teacher_rows(teacher, student_data: Encoded, teacher_data: Encoded):
    """The teacher's logits at the student positions (B, L_s, V_t) and the ULD labels: 0 where
    a student position with a target has an aligned teacher position, -100 elsewhere."""
    index = alignment.align_batch(student_data.offsets, teacher_data.offsets,
                                  student_length=student_data.ids.shape[1])
    with torch.no_grad():
        t_logits = torch.cat([teacher(input_ids=teacher_data.ids[i:i + 64]).logits.float()
                              for i in range(0, len(teacher_data.ids), 64)])
    rows = alignment.gather_rows(t_logits, index)
    labels = torch.where((index >= 0) & (student_data.targets != -100), 0, -100)
    return rows, labels, index


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pydistill.examples.cross_tokenizer",
        description="Distil a teacher into a student with a different tokenizer (ULD on "
                    "offset-aligned positions); compare with hard labels only.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small configuration (< 1 minute)")
    p.add_argument("--seed", type=int, default=0, help="language, data and model seed")
    p.add_argument("--student-hidden", type=int, default=None,
                   help="student width (default 32, --quick 16)")
    p.add_argument("--temperature", type=float, default=1.0, help="T of the ULD term")
    p.add_argument("--top-k", type=int, default=32,
                   help="ranks compared by ULD (0: all, the full sort)")
    p.add_argument("--uld-weight", type=float, default=1.0, help="weight of the ULD term")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--plot", default=None, help="where to save the plot (PNG); '' for none")
    args = p.parse_args(argv)
    common.need_transformers()
    need_tokenizers()
    common.setup_threads(args.threads)
    start = time.perf_counter()
    s = SIZES["quick" if args.quick else "full"]

    lang = common.make_language(s["words"], s["states"], args.seed)
    words = make_words(s["words"], args.seed + 3)
    teacher_seqs = common.sample_corpus(lang, s["teacher_seqs"], s["length"], args.seed + 1)
    student_seqs = teacher_seqs[:s["student_seqs"]]  # a small part of the teacher's corpus
    heldout_seqs = common.sample_corpus(lang, s["heldout"], s["length"], args.seed + 2)
    teacher_texts, student_texts = to_text(teacher_seqs, words), to_text(student_seqs, words)
    heldout_texts = to_text(heldout_seqs, words)
    t_tok = train_tokenizer(teacher_texts, s["teacher_vocab"], byte_level=True)
    s_tok = train_tokenizer(student_texts, s["student_vocab"], byte_level=False)

    # 1. the teacher, in its own tokenization
    t_train = encode(t_tok, teacher_texts)
    teacher = common.llama(t_tok.get_vocab_size(), s["teacher"][0], s["teacher"][1],
                           t_train.ids.shape[1] + 8, args.seed + 10)
    common.train(teacher, len(t_train.ids), hard_loss_fn(teacher, t_train), steps=s["teacher_steps"],
                 batch=s["batch"], lr=3e-3, seed=args.seed + 11, desc="teacher")
    teacher.eval()
    t_heldout = encode(t_tok, heldout_texts)
    teacher_eval = evaluate(teacher, t_heldout, heldout_texts)

    # 2. the student's data in both tokenizations, aligned
    s_train, s_heldout = encode(s_tok, student_texts), encode(s_tok, heldout_texts)
    rows, uld_labels, index = aligned_teacher_rows(teacher, s_train, encode(t_tok, student_texts))
    n_targets = int((s_train.targets != -100).sum())
    n_aligned = int((uld_labels != -100).sum())

    # 3. two students, same init and batches
    hidden = args.student_hidden or (16 if args.quick else 32)
    length = max(s_train.ids.shape[1], s_heldout.ids.shape[1]) + 8
    init = common.llama(s_tok.get_vocab_size(), hidden, 1, length, args.seed + 20, heads=2).state_dict()

    def fresh():
        model = common.llama(s_tok.get_vocab_size(), hidden, 1, length, 0, heads=2)
        model.load_state_dict(init)
        return model

    every = max(1, s["student_steps"] // 10)
    runs = {}
    uld = pydistill.ULDLoss(temperature=args.temperature, top_k=args.top_k or None)
    for name, make_loss in (
            ("hard-only", lambda m: hard_loss_fn(m, s_train)),
            ("ULD + CE", lambda m: uld_loss_fn(m, s_train, rows, uld_labels,
                                               pydistill.DistillationObjective(
                                                   {"uld": uld, "ce": common.hard_ce},
                                                   weights={"uld": args.uld_weight, "ce": 1.0})))):
        model = fresh()
        curve = common.train(model, len(s_train.ids), make_loss(model), steps=s["student_steps"],
                             batch=min(s["batch"], len(s_train.ids)), lr=1e-2, seed=args.seed + 30,
                             eval_fn=lambda m=model: evaluate(m, s_heldout, heldout_texts)[0],
                             eval_every=every, desc=f"student {name}")
        runs[name] = (model, curve, evaluate(model, s_heldout, heldout_texts))
    elapsed = time.perf_counter() - start
    oracle = oracle_per_char(lang, heldout_seqs, heldout_texts)

    print(f"Cross-tokenizer distillation on a generated language (HMM: {s['states']} states, "
          f"{s['words']} words, {s['length']} words per sequence)")
    print(f"  teacher  Llama {s['teacher'][1]} layers x {s['teacher'][0]}, byte-level BPE of "
          f"{t_tok.get_vocab_size()} tokens ({float(t_heldout.lengths.float().mean()):.1f} tokens "
          f"per held-out sequence), {s['teacher_steps']} steps on {len(teacher_texts)} sequences")
    print(f"  students Llama 1 layer x {hidden}, Metaspace BPE of {s_tok.get_vocab_size()} tokens "
          f"({float(s_heldout.lengths.float().mean()):.1f} tokens per sequence), "
          f"{s['student_steps']} steps on {len(student_texts)} sequences, same init and batches")
    print(f"  ULD      {args.uld_weight:g} * uld_loss(T = {args.temperature:g}, top_k = "
          f"{args.top_k or 'all'}) + CE, on the {n_aligned} of {n_targets} student positions "
          f"whose text prefix ends where a teacher token ends")
    print()
    print("Held-out loss (lower is better; per character: after each sequence's first word)")
    print(f"  {'model':<34} {'params':>8} {'nats/token':>11} {'nats/char':>10} {'best nats/token (step)':>23}")
    print(f"  {'teacher (its own tokens)':<34} {common.n_params(teacher):>8,} "
          f"{teacher_eval[0]:>11.4f} {teacher_eval[1]:>10.4f}")
    labels = {"hard-only": "student, hard labels only", "ULD + CE": "student, ULD + CE"}
    for name, (model, curve, (per_token, per_char)) in runs.items():
        low, step = common.best(curve)
        print(f"  {labels[name]:<34} {common.n_params(model):>8,} {per_token:>11.4f} "
              f"{per_char:>10.4f} {f'{low:.4f} ({step})':>23}")
    print(f"  {'oracle (the HMM, forward algorithm)':<34} {'':>8} {'':>11} {oracle:>10.4f}")
    hard, with_uld = runs["hard-only"], runs["ULD + CE"]
    gain = hard[2][0] - with_uld[2][0]
    gain_best = common.best(hard[1])[0] - common.best(with_uld[1])[0]
    print()
    print(f"(ULD + CE) - hard-only: {-gain:+.4f} nats/token at the end, {-gain_best:+.4f} at each "
          f"run's best ({'ULD helps' if gain_best > 0 else 'ULD does not help'} here; "
          f"{elapsed:.0f} s).")
    if args.quick:
        print("(--quick is a smoke test: the teacher is undertrained and the runs short; "
              "the full run is the comparison)")
    plot = common.save_plot(args.plot if args.plot is not None else "cross_tokenizer.png",
                            "Student held-out loss: hard labels vs ULD + CE",
                            {name: curve for name, (_, curve, _) in runs.items()},
                            ylabel="held-out loss (nats/student token)")
    if plot:
        print(f"plot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

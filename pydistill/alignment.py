"""Sequence alignment across tokenizers, by character offsets: which teacher position goes with
which student position when the two models tokenize the same text differently.

Both tokenizations come with each token's (start, end) offsets into the text (Hugging Face
fast tokenizers: ``return_offsets_mapping=True``; ``tokenizers``: ``Encoding.offsets``). Any
unit works (characters, or UTF-8 bytes as TRL's GOLD uses) as long as both sides use the same.

The rule: **a student position i and a teacher position j are aligned when their tokens end
at the same offset c**. A causal LM's logits at a token predict what follows it, so the logits
of i and j are then both conditioned on exactly the text ``text[:c]``: they are two models'
next-token distributions after the same prefix, which is what ``uld_loss`` compares (ULD
needs no token correspondence, only the same context). Consequences:

- a token that spans several of the other side's tokens ("hello" against "hel" + "lo") is
  aligned with the last of them (both end after "o"); the positions inside it ("hel") have no
  partner and are left out (-1);
- where several tokens of one side end at the same offset (a character split into several
  byte-level tokens, which all carry that character's offsets) the last one represents it:
  only after it is the character complete. Generally a token counts as ending at c only when
  no later token starts before c (offsets that overlap the next token's, as those of the
  space a Metaspace tokenizer prepends to a text, do not mark a complete prefix);
- zero-width tokens (start == end: BOS / EOS / padding added without text, the (0, 0) of
  special tokens) are never aligned; pass masks for padding in the batched helpers.

On offsets that never overlap (GOLD's byte offsets, normalised so) these are the end points of
the spans TRL's GOLD trainer merges (``ULDLoss._align_by_byte_offsets``
closes a group wherever both sides reach the same boundary): ``alignment_groups`` returns those
spans, and the aligned pairs are their last tokens. GOLD goes further and multiplies the
probabilities of the tokens inside a span into its first or last position; this module only
picks the positions (gather the rows, then call ``uld_loss``)::

    idx = align_batch(student_offsets, teacher_offsets, student_mask, teacher_mask)  # (B, L_s)
    t_rows = gather_rows(teacher_logits, idx)                                        # (B, L_s, V_t)
    labels = torch.where(idx >= 0, 0, -100)            # only the aligned rows count
    loss = pydistill.uld_loss(student_logits, t_rows, labels=labels, top_k=64)

Everything here runs on the host (it is data preparation, done once per batch or once per
dataset), except ``gather_rows``, which indexes on the logits' device.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

__all__ = ["align_offsets", "alignment_pairs", "alignment_groups", "align_batch", "gather_rows"]


def _offsets(name: str, offsets) -> List[Tuple[int, int]]:
    """(start, end) pairs from a list of pairs or an (L, 2) tensor / array."""
    if isinstance(offsets, torch.Tensor):
        if offsets.dim() != 2 or offsets.shape[-1] != 2:
            raise ValueError(f"{name}: expected offsets of shape (L, 2), got {tuple(offsets.shape)}")
        if offsets.dtype.is_floating_point or offsets.dtype.is_complex:
            raise TypeError(f"{name}: expected integer offsets, got {offsets.dtype}")
        return [tuple(pair) for pair in offsets.tolist()]
    try:
        pairs = [tuple(int(v) for v in pair) for pair in offsets]
    except TypeError:
        raise TypeError(f"{name}: expected a sequence of (start, end) pairs or an (L, 2) integer "
                        f"tensor, got {type(offsets).__name__}") from None
    for k, pair in enumerate(pairs):
        if len(pair) != 2:
            raise ValueError(f"{name}: expected (start, end) pairs, got {pair} at position {k}")
    return pairs


def _mask(name: str, mask, length: int) -> List[bool]:
    if mask is None:
        return [True] * length
    values = mask.tolist() if isinstance(mask, torch.Tensor) else list(mask)
    if len(values) != length:
        raise ValueError(f"{name}: expected {length} entries (one per token), got {len(values)}")
    return [bool(v) for v in values]


def _ends(offsets, mask) -> dict:
    """end offset c -> the position of the token after which the text up to c is complete:
    a non-zero-width token ending at c that no later (non-zero-width) token starts before.
    That drops all but the last of tokens sharing an end, and a token whose offsets overlap
    its successor's (the space a Metaspace tokenizer prepends to a text carries the first
    character's offsets, then the first word's token starts at 0 again)."""
    out = {}
    later_start = None  # the smallest start of the non-zero-width tokens after pos
    for pos in range(len(offsets) - 1, -1, -1):
        start, end = offsets[pos]
        if end <= start:
            continue
        if mask[pos] and end not in out and (later_start is None or later_start >= end):
            out[end] = pos
        later_start = start if later_start is None else min(later_start, start)
    return out


def alignment_pairs(student_offsets, teacher_offsets, student_mask=None,
                    teacher_mask=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The aligned (student position, teacher position) pairs of one sequence, as two int64
    tensors of equal length, in increasing order of the shared end offset.

    Args:
        student_offsets, teacher_offsets: each token's (start, end), as a list of pairs or an
            (L, 2) integer tensor, of the same text in the same unit.
        student_mask, teacher_mask: optional (L,) truthy entries for the tokens that may be
            aligned (e.g. the attention mask: 0 on padding, whose offsets are (0, 0) anyway).
    """
    s = _offsets("student_offsets", student_offsets)
    t = _offsets("teacher_offsets", teacher_offsets)
    s_ends = _ends(s, _mask("student_mask", student_mask, len(s)))
    t_ends = _ends(t, _mask("teacher_mask", teacher_mask, len(t)))
    shared = sorted(set(s_ends) & set(t_ends))
    return (torch.tensor([s_ends[c] for c in shared], dtype=torch.int64),
            torch.tensor([t_ends[c] for c in shared], dtype=torch.int64))


def align_offsets(student_offsets, teacher_offsets, student_mask=None,
                  teacher_mask=None) -> torch.Tensor:
    """For each student position of one sequence, its aligned teacher position, or -1: an int64
    tensor (L_s,). Arguments as in :func:`alignment_pairs`."""
    s_pos, t_pos = alignment_pairs(student_offsets, teacher_offsets, student_mask, teacher_mask)
    length = len(_offsets("student_offsets", student_offsets))
    index = torch.full((length,), -1, dtype=torch.int64)
    index[s_pos] = t_pos
    return index


def _check_ends_sorted(name: str, offsets) -> None:
    """The walk of ``alignment_groups`` needs the ends of the non-zero-width tokens in
    non-decreasing order (unsorted offsets made empty groups)."""
    last = None  # (position, end) of the last non-zero-width token
    for pos, (start, end) in enumerate(offsets):
        if end <= start:
            continue
        if last is not None and end < last[1]:
            raise ValueError(f"{name}: expected token ends in non-decreasing order (tokens in text "
                             f"order), got end {end} at position {pos} after end {last[1]} at "
                             f"position {last[0]}")
        last = (pos, end)


def alignment_groups(student_offsets, teacher_offsets) -> Tuple[List[List[int]], List[List[int]]]:
    """The spans between consecutive shared boundaries, GOLD's grouping: (student groups,
    teacher groups), two lists of equally many lists of consecutive positions; group g of
    each side covers the same text, and ends at a shared boundary (except possibly a last
    group holding what is left when the tokenizations end differently). Walks both sides,
    advancing the one whose current token ends first; the tokens' ends must not decrease
    (zero-width tokens aside), else a ``ValueError`` names the first that does. Zero-width
    tokens are kept (they join the group they fall in)."""
    s = _offsets("student_offsets", student_offsets)
    t = _offsets("teacher_offsets", teacher_offsets)
    _check_ends_sorted("student_offsets", s)
    _check_ends_sorted("teacher_offsets", t)
    s_groups, t_groups = [], []
    i = j = i0 = j0 = 0
    while i < len(s) and j < len(t):
        if s[i][1] < t[j][1]:
            i += 1
        elif s[i][1] > t[j][1]:
            j += 1
        else:
            i, j = i + 1, j + 1
            s_groups.append(list(range(i0, i)))
            t_groups.append(list(range(j0, j)))
            i0, j0 = i, j
    if i < len(s) or j < len(t):
        s_groups.append(list(range(i0, len(s))))
        t_groups.append(list(range(j0, len(t))))
    return s_groups, t_groups


def align_batch(student_offsets, teacher_offsets, student_mask=None, teacher_mask=None,
                student_length: Optional[int] = None) -> torch.Tensor:
    """:func:`align_offsets` for a batch: (B, L_s) int64, the teacher position aligned with each
    student position, -1 where there is none.

    Args:
        student_offsets: (B, L_s, 2) integer tensor, or a list of B per-sequence offset lists
            (ragged: positions past a sequence's end get -1).
        teacher_offsets: (B, L_t, 2) or a list of B offset lists.
        student_mask, teacher_mask: optional (B, L) masks (1 = a real token), or lists.
        student_length: L_s of the result for ragged lists (default: the longest sequence).
    """
    n = len(student_offsets)
    if len(teacher_offsets) != n:
        raise ValueError(f"teacher_offsets: expected {n} sequences (as many as student_offsets), "
                         f"got {len(teacher_offsets)}")
    rows = []
    for b in range(n):
        rows.append(align_offsets(student_offsets[b], teacher_offsets[b],
                                  None if student_mask is None else student_mask[b],
                                  None if teacher_mask is None else teacher_mask[b]))
    longest = max((len(r) for r in rows), default=0)
    length = longest if student_length is None else student_length
    if length < longest:
        raise ValueError(f"student_length: expected at least {longest} (the longest sequence), got {length}")
    out = torch.full((n, length), -1, dtype=torch.int64)
    for b, r in enumerate(rows):
        out[b, :len(r)] = r
    return out


def gather_rows(teacher: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The teacher rows aligned with each student position: ``teacher`` (B, L_t, D) (logits,
    or hidden states for :func:`pydistill.linear_uld_loss`) and ``index`` (B, L_s) from
    :func:`align_batch` give (B, L_s, D), row ``index[b, i]`` of sequence b; where the index is
    -1 the row is that of position 0 (a placeholder: mask those rows, e.g. with
    ``labels = torch.where(index >= 0, 0, -100)``). Differentiable w.r.t. ``teacher``.

    Entries must lie in [-1, L_t). An index on the CPU (as :func:`align_batch` makes it) is
    checked there, which costs no device synchronisation: an entry out of range is a
    ``ValueError`` naming it. An index already on the GPU is not read back to the host (that
    would synchronise every call): an out-of-range entry gives a row of NaN (floating teachers)
    instead of a device-side assert or a silently borrowed row, so it shows in the loss."""
    if not isinstance(teacher, torch.Tensor) or teacher.dim() != 3:
        raise ValueError(f"teacher: expected a (B, L_t, D) tensor, got "
                         f"{tuple(teacher.shape) if isinstance(teacher, torch.Tensor) else type(teacher).__name__}")
    if not isinstance(index, torch.Tensor) or index.dim() != 2 or index.shape[0] != teacher.shape[0]:
        raise ValueError(f"index: expected a ({teacher.shape[0]}, L_s) tensor (B of teacher), got "
                         f"{tuple(index.shape) if isinstance(index, torch.Tensor) else type(index).__name__}")
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"index: expected dtype torch.int64 or torch.int32, got {index.dtype}")
    length = teacher.shape[1]
    if length == 0 and index.numel():
        raise ValueError(f"teacher: expected at least one position to gather from, got shape "
                         f"{tuple(teacher.shape)}")
    if index.device.type == "cpu":
        bad = (index < -1) | (index >= length)
        if bool(bad.any()):
            b, i = bad.nonzero()[0].tolist()
            raise ValueError(f"index: expected entries in [-1, {length}) (a teacher position, or -1 "
                             f"for none; L_t = {length}), got {int(index[b, i])} at [{b}, {i}]")
    idx = index.to(device=teacher.device, dtype=torch.int64)
    safe = idx.clamp(0, max(length - 1, 0))[..., None].expand(-1, -1, teacher.shape[-1])
    rows = teacher.gather(1, safe)
    if index.device.type != "cpu" and teacher.is_floating_point():  # no host sync: NaN rows
        rows = torch.where(((idx < -1) | (idx >= length))[..., None], float("nan"), rows)
    return rows


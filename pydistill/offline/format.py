"""The store's encoding: bit-packed token ids and quantised log-probabilities.

One stored entry is a (token id, log-probability) pair; a position holds K of them, sorted by
log-probability, highest first (for ``method="sample"``: by count, highest first).

Token ids
    Each id is written in ``b = ceil(log2 V)`` bits (18 bits at V = 151,936), little-endian
    bit order, the K ids of one position packed into ``ceil(K * b / 8)`` bytes that start on a
    byte boundary (at K = 64, b = 18: exactly 144 bytes). Entry n of a position occupies bits
    ``[n * b, n * b + b)``; :func:`unpack_ids` reads it back with four byte gathers, a shift
    and a mask (torch integer ops, so it runs where the bytes are: CPU or GPU). V <= 2**25.

Log-probabilities (``method="topk"``)
    With x = -log p >= 0, an integer code in [0, 65534] (uint16):

        code = round(64 x)                     for x <= 9.25  (p >= 9.6e-5: every p >= 1e-4)
        code = 592 + round(8 (x - 9.25))       for x >  9.25

    and back x = code / 64, or 9.25 + (code - 592) / 8. The error is at most 1/128 nat
    (0.0078) for every entry with p >= 9.6e-5, and at most 1/16 nat below (a relative error of
    at most 6.5 % of a probability under 1e-4: about 1e-5 of total mass over 128 such entries);
    log-probs below -8127 nats are stored as -8127 (zero in float32). The code 65535 is -inf (an
    unused slot: id 0). The coarse tail saves 1-1.6 bits an entry on confident teachers, whose
    top-k reaches far below p = 1e-4. Codes of a position are non-decreasing, so on disk they
    are written as their differences (the first one as is), low bytes then high bytes, which the
    container's compressor (zstd) shrinks to ~3-5 bits per entry; :func:`codes_to_logprobs` is
    the inverse.

Counts (``method="sample"``)
    The number of times each distinct drawn id was drawn, uint8 when ``samples < 256`` and
    uint16 otherwise (little-endian); unused slots count 0 (id 0). The log-probability of an
    entry is ``log(count / samples)`` (-inf for unused slots).

Everything here is pure torch / NumPy so that readers and the device decoder share it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

FORMAT_VERSION = 1
CODE_SCALE = 64                   # codes per nat down to BREAK_NATS below 0
BREAK_NATS = 9.25                 # -log(9.6e-5): finer than p = 1e-4
BREAK_CODE = 592                  # BREAK_NATS * CODE_SCALE
TAIL_SCALE = 8                    # codes per nat below -BREAK_NATS
CODE_INF = 65535                  # -inf (unused slot)
CODE_MAX = 65534                  # the most negative finite log-prob
MIN_LOGPROB = -(BREAK_NATS + (CODE_MAX - BREAK_CODE) / TAIL_SCALE)   # -8127 nats
QUANT_ERROR = 0.5 / CODE_SCALE    # 1/128 nat: the largest |stored - true| for log p >= -9.25
TAIL_QUANT_ERROR = 0.5 / TAIL_SCALE   # 1/16 nat: below -9.25 (down to MIN_LOGPROB)
# Log-probs are refused when one is above 0, or a row's logsumexp is above 0, by more than
# this: twice the quantisation error, far below what raw logits stored by mistake look like.
LOGPROB_TOL = 2 * QUANT_ERROR
MAX_VOCAB = 2 ** 25               # ids are gathered from 4 bytes with a shift of up to 7 bits


def id_bits(vocab_size: int) -> int:
    """Bits per stored id: ceil(log2 V), at least 1."""
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise ValueError(f"vocab_size: expected an int >= 1, got {vocab_size!r}")
    if vocab_size > MAX_VOCAB:
        raise ValueError(f"vocab_size: expected at most {MAX_VOCAB} (ids are packed in at most "
                         f"25 bits), got {vocab_size}")
    return max(1, math.ceil(math.log2(vocab_size)))


def packed_width(k: int, bits: int) -> int:
    """Bytes holding the k ids of one position."""
    return (k * bits + 7) // 8


def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """(M, K) non-negative ints below 2**bits -> (M, ceil(K * bits / 8)) uint8."""
    ids = np.ascontiguousarray(ids, dtype="<u4")
    m, k = ids.shape
    b = np.unpackbits(ids.reshape(m * k, 1).view(np.uint8), axis=1, bitorder="little")[:, :bits]
    return np.packbits(b.reshape(m, k * bits), axis=1, bitorder="little")


def unpack_ids(packed: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """(..., P) uint8 -> (..., k) int64, on ``packed``'s device (the inverse of :func:`pack_ids`).

    Entry n starts at bit n * bits: byte (n * bits) >> 3, shift (n * bits) & 7; four bytes
    cover it (bits + 7 <= 32). Gathers past the last byte are clamped to it: they only feed bits
    above ``bits``, which the mask drops."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed: expected a uint8 tensor, got {packed.dtype}")
    width = packed.shape[-1]
    if width != packed_width(k, bits):
        raise ValueError(f"packed: expected {packed_width(k, bits)} bytes per position "
                         f"(k={k}, bits={bits}), got shape {tuple(packed.shape)}")
    start = torch.arange(k, device=packed.device, dtype=torch.int64) * bits
    first, shift = start >> 3, start & 7
    word = torch.zeros(packed.shape[:-1] + (k,), dtype=torch.int64, device=packed.device)
    for j in range(4):
        idx = (first + j).clamp_(max=width - 1).expand(packed.shape[:-1] + (k,))
        word |= torch.gather(packed, -1, idx).to(torch.int64) << (8 * j)
    return (word >> shift) & ((1 << bits) - 1)


def logprobs_to_codes(logprobs: np.ndarray) -> np.ndarray:
    """Float log-probs -> uint16 codes (module docstring; -inf -> 65535)."""
    x = -np.asarray(logprobs, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        codes = np.where(x <= BREAK_NATS, np.rint(x * CODE_SCALE),
                         BREAK_CODE + np.rint((x - BREAK_NATS) * TAIL_SCALE))
    codes = np.clip(np.nan_to_num(codes, posinf=CODE_MAX), 0, CODE_MAX)
    codes[np.isposinf(x)] = CODE_INF
    return codes.astype(np.uint16)


def codes_to_logprobs(codes: torch.Tensor) -> torch.Tensor:
    """uint16 codes held in any integer tensor (int16 bit patterns included) -> float32 log-probs,
    on ``codes``' device."""
    c = codes.to(torch.int32) & 0xFFFF
    cf = c.to(torch.float32)
    lp = torch.where(c <= BREAK_CODE, cf * (-1.0 / CODE_SCALE),
                     (cf - BREAK_CODE) * (-1.0 / TAIL_SCALE) - BREAK_NATS)
    return lp.masked_fill_(c == CODE_INF, float("-inf"))


def error_bound(logprobs):
    """The largest |stored - true| of each log-prob (a tensor or array): 1/128 nat for log p >=
    -9.25, 1/16 nat below."""
    if isinstance(logprobs, torch.Tensor):
        return torch.where(logprobs >= -BREAK_NATS, QUANT_ERROR, TAIL_QUANT_ERROR)
    return np.where(np.asarray(logprobs) >= -BREAK_NATS, QUANT_ERROR, TAIL_QUANT_ERROR)


def counts_to_logprobs(counts: torch.Tensor, samples: int) -> torch.Tensor:
    """(..., K) counts -> log(count / samples) in float32 (-inf where the count is 0)."""
    return torch.log(counts.to(torch.float32) / float(samples))


def encode_codes(codes: np.ndarray) -> bytes:
    """(M, K) uint16 codes, non-decreasing along K -> bytes: the differences along K (the first
    code as is), low-byte plane then high-byte plane."""
    c = codes.astype(np.int32)
    gaps = np.diff(c, axis=1, prepend=0).astype(np.uint16)
    return (gaps & 0xFF).astype(np.uint8).tobytes() + (gaps >> 8).astype(np.uint8).tobytes()


def decode_codes(blob: bytes, m: int, k: int) -> np.ndarray:
    """The inverse of :func:`encode_codes`: (m, k) uint16."""
    planes = np.frombuffer(blob, dtype=np.uint8)
    if planes.size != 2 * m * k:
        raise ValueError(f"teacher_codes: expected {2 * m * k} bytes for {m} positions of "
                         f"{k} entries, got {planes.size}")
    gaps = planes[:m * k].astype(np.int32) | (planes[m * k:].astype(np.int32) << 8)
    return np.cumsum(gaps.reshape(m, k), axis=1).astype(np.uint16)


def count_dtype(samples: int):
    return np.uint8 if samples < 256 else np.dtype("<u2")


def check_logprobs(name: str, logprobs: torch.Tensor, tol: float = LOGPROB_TOL) -> None:
    """Refuse values that cannot be log-probabilities: an entry above 0, or a row (last dim)
    whose logsumexp is above 0, by more than ``tol`` nats; NaN is refused too. Raw logits
    stored by mistake fail this (their logsumexp is far above 0)."""
    if not isinstance(logprobs, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of log-probabilities, got "
                        f"{type(logprobs).__name__}")
    if not logprobs.is_floating_point():
        raise TypeError(f"{name}: expected a floating tensor of log-probabilities, got {logprobs.dtype}")
    if logprobs.numel() == 0:
        return
    lp = logprobs.detach().float()
    if torch.isnan(lp).any():
        raise ValueError(f"{name}: expected log-probabilities, got NaN")
    top = lp.max()
    if top > tol:
        raise ValueError(f"{name}: expected log-probabilities (every entry <= 0, up to {tol:g} of "
                         f"rounding), got an entry of {top.item():.6g} (raw logits?)")
    lse = torch.logsumexp(lp, dim=-1)
    worst = lse.max()
    if worst > tol:
        raise ValueError(f"{name}: expected log-probabilities whose rows sum to at most 1 "
                         f"(logsumexp <= 0, up to {tol:g} of rounding), got a row with logsumexp "
                         f"{worst.item():.6g} (probabilities summing to {math.exp(worst.item()):.6g})")

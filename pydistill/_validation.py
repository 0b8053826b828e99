"""Argument checks shared by every public function.

Each failure is a ValueError or TypeError that names the argument, what was expected and
what was given. The checks read only shapes, dtypes, devices and Python scalars, so they
never synchronise with the device (label ranges are checked only for CPU tensors).
"""
from __future__ import annotations

import math
import numbers

import torch

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, x, *, floating: bool = True) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in _FLOATING:
        raise TypeError(
            f"{name}: expected a floating tensor ({', '.join(map(str, _FLOATING))}), got {x.dtype}"
        )
    return x


def logits_pair(student_name: str, student, teacher_name: str, teacher):
    """Student and teacher logits of identical shape (..., V), V >= 1, on one device."""
    tensor(student_name, student)
    tensor(teacher_name, teacher)
    if student.dim() < 1:
        raise ValueError(f"{student_name}: expected shape (..., V), got a 0-dim tensor")
    if student.shape[-1] == 0:
        raise ValueError(f"{student_name}: expected a vocabulary size V >= 1, got shape {tuple(student.shape)}")
    if teacher.shape[-1] != student.shape[-1]:
        raise ValueError(
            f"{teacher_name}: expected vocabulary size {student.shape[-1]} (that of {student_name}), "
            f"got shape {tuple(teacher.shape)}"
        )
    if teacher.shape != student.shape:
        raise ValueError(
            f"{teacher_name}: expected shape {tuple(student.shape)} (that of {student_name}), "
            f"got {tuple(teacher.shape)}"
        )
    same_device(teacher_name, teacher, student_name, student)


def same_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor):
    if x.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} (the device of {ref_name}), got {x.device}")


# How far above 0 a stored log-probability, or a row's logsumexp, may lie and still be read as
# rounding: twice the 0.01-nat error bound of a quantised offline store (pydistill.offline), far
# above float16's. Raw logits stored by mistake exceed it by orders of magnitude.
LOGPROB_SLACK = 0.02


def topk_inputs(student_name: str, student, logprobs_name: str, logprobs, indices_name: str, indices,
                labels=None, ignore_index: int = -100, check_values=None):
    """Student logits (..., V), V >= 1, and a top-k teacher: log-probs (..., K) floating and
    token ids (..., K) int64 / int32, with the student's leading dims, 1 <= K <= V, one device.

    Values, in the rows the loss counts only (``labels`` != ``ignore_index``; every row without
    labels): rows it ignores are never read, so they may hold anything (padding ids, repeats,
    ids out of range, NaN). Ids in [0, V), distinct within a row; log-probs that can be
    log-probabilities: each <= 0 and each row's logsumexp <= 0 (its probabilities summing to at
    most 1), both up to ``LOGPROB_SLACK`` nats for rounding and quantisation (NaN is let through:
    it propagates to the loss). ``check_values``: None checks CPU tensors only (a GPU check
    would synchronise); True checks on any device (one host synchronisation); False skips them."""
    tensor(student_name, student)
    tensor(logprobs_name, logprobs)
    tensor(indices_name, indices, floating=False)
    if student.dim() < 1:
        raise ValueError(f"{student_name}: expected shape (..., V), got a 0-dim tensor")
    vocab, lead = student.shape[-1], tuple(student.shape[:-1])
    if vocab == 0:
        raise ValueError(f"{student_name}: expected a vocabulary size V >= 1, got shape {tuple(student.shape)}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{indices_name}: expected dtype torch.int64 or torch.int32, got {indices.dtype}")
    if logprobs.dim() < 1 or tuple(logprobs.shape[:-1]) != lead:
        raise ValueError(f"{logprobs_name}: expected shape {lead + ('K',)} (the leading dims of "
                         f"{student_name}), got {tuple(logprobs.shape)}")
    if indices.shape != logprobs.shape:
        raise ValueError(f"{indices_name}: expected shape {tuple(logprobs.shape)} (that of "
                         f"{logprobs_name}), got {tuple(indices.shape)}")
    k = logprobs.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"{logprobs_name}: expected 1 <= K <= V = {vocab} entries per row, got K = {k}")
    same_device(logprobs_name, logprobs, student_name, student)
    same_device(indices_name, indices, student_name, student)
    if check_values is None:
        check_values = indices.device.type == "cpu"
    if not check_values or indices.numel() == 0 or _compiling():
        return
    rows = torch.arange(indices.numel() // k, device=indices.device)
    ids, lp = indices.reshape(-1, k), logprobs.detach().reshape(-1, k)
    if (isinstance(labels, torch.Tensor) and tuple(labels.shape) == lead
            and labels.device == indices.device):  # else the labels check reports them
        counted = labels.reshape(-1) != ignore_index
        rows, ids, lp = rows[counted], ids[counted], lp[counted]
    bad = (ids < 0) | (ids >= vocab)
    if bool(bad.any()):
        raise ValueError(f"{indices_name}: expected values in [0, {vocab}), got {int(ids[bad][0])} "
                         f"(in row {int(rows[bad.nonzero()[0, 0]])} of the rows flattened)")
    ids = ids.sort(dim=-1).values
    twice = ids[:, 1:] == ids[:, :-1]
    if bool(twice.any()):
        row, col = twice.nonzero()[0].tolist()
        raise ValueError(f"{indices_name}: expected distinct ids within a row, got {int(ids[row, col])} "
                         f"twice in row {int(rows[row])} (of the rows flattened)")
    lp = lp.double()
    hint = ("; raw logits stored instead of log-probabilities? Store log_softmax(logits / T) "
            "(pydistill.offline.capture does)")
    positive = lp > LOGPROB_SLACK
    if bool(positive.any()):
        row = positive.nonzero()[0, 0]
        raise ValueError(f"{logprobs_name}: expected log-probabilities (<= 0, up to {LOGPROB_SLACK} "
                         f"for rounding), got {float(lp[positive][0]):.6g} in row {int(rows[row])} "
                         f"(of the rows flattened){hint}")
    lse = torch.logsumexp(lp, dim=-1)
    over = lse > LOGPROB_SLACK
    if bool(over.any()):
        row = over.nonzero()[0, 0]
        raise ValueError(f"{logprobs_name}: expected log-probabilities whose probabilities sum to "
                         f"at most 1 per row (logsumexp <= 0, up to {LOGPROB_SLACK} for rounding), got "
                         f"a row summing to {math.exp(min(float(lse[row]), 700.0)):.6g} (logsumexp "
                         f"{float(lse[row]):.6g}) in row {int(rows[row])} (of the rows flattened){hint}")


def _compiling() -> bool:
    """Under torch.compile the value checks of CPU tensors are skipped, as for GPU tensors:
    they read values on the host, which a traced graph cannot branch on (an out-of-range
    label then gives NaN; bad top-k ids or mask values go unnoticed)."""
    return torch.compiler.is_compiling()


def labels(name: str, y, lead_shape: torch.Size, ref_name: str, ref: torch.Tensor, *,
           vocab: int, ignore_index: int, check_range: bool):
    if y is None:
        return None
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name}: expected an integer torch.Tensor or None, got {type(y).__name__}")
    if y.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: expected dtype torch.int64 or torch.int32, got {y.dtype}")
    if y.shape != lead_shape:
        raise ValueError(
            f"{name}: expected shape {tuple(lead_shape)} (the leading dims of {ref_name}), got {tuple(y.shape)}"
        )
    same_device(name, y, ref_name, ref)
    if check_range and y.device.type == "cpu" and y.numel() > 0 and not _compiling():
        bad = (y != ignore_index) & ((y < 0) | (y >= vocab))
        if bool(bad.any()):
            value = int(y[bad][0])
            raise ValueError(
                f"{name}: expected values in [0, {vocab}) or ignore_index={ignore_index}, got {value}"
            )
    return y


def real(name: str, value, *, low=None, high=None, low_open=False, finite=True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a Python float, got {type(value).__name__}")
    value = float(value)
    if finite and not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"{name}: expected a number {bound}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name}: expected a number <= {high}, got {value}")
    return value


def integer(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    return int(value)


def boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def choice(name: str, value, choices) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a str, one of {tuple(choices)}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def linear_head(hidden_name: str, hidden, weight_name: str, weight, bias_name: str, bias):
    """A linear head: hidden (..., H), weight (V, H) with V >= 1, bias (V,) or None; one dtype
    (that of hidden) and one device."""
    tensor(hidden_name, hidden)
    tensor(weight_name, weight)
    if hidden.dim() < 1:
        raise ValueError(f"{hidden_name}: expected shape (..., H), got a 0-dim tensor")
    if hidden.shape[-1] == 0:
        raise ValueError(f"{hidden_name}: expected a hidden size H >= 1 (the last dim), got shape "
                         f"{tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"{weight_name}: expected shape (V, H) with V >= 1, got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{weight_name}: expected shape (V, {hidden.shape[-1]}) (H = the last dim of "
            f"{hidden_name}, shape {tuple(hidden.shape)}), got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{weight_name}: expected dtype {hidden.dtype} (that of {hidden_name}), got {weight.dtype}")
    same_device(weight_name, weight, hidden_name, hidden)
    if bias is not None:
        tensor(bias_name, bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(
                f"{bias_name}: expected shape ({weight.shape[0]},) (V of {weight_name}), got {tuple(bias.shape)}"
            )
        if bias.dtype != weight.dtype:
            raise TypeError(f"{bias_name}: expected dtype {weight.dtype} (that of {weight_name}), got {bias.dtype}")
        same_device(bias_name, bias, weight_name, weight)


def leading_dims(name: str, x: torch.Tensor, lead: torch.Size, ref_name: str, ref: torch.Tensor):
    """x of shape lead + (something,), on ref's device."""
    if x.dim() < 1 or x.shape[:-1] != lead:
        raise ValueError(
            f"{name}: expected leading dims {tuple(lead)} (those of {ref_name}), got shape {tuple(x.shape)}"
        )
    same_device(name, x, ref_name, ref)


def chunk_size(name: str, value):
    """'auto', 'tiled' or a positive int."""
    if isinstance(value, str) and value in ("auto", "tiled"):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected 'auto', 'tiled' or a positive int (rows per chunk), got {value!r}")
    return int(value)


def process_group(name: str, group):
    """None, or a torch.distributed process group of an initialised default group."""
    if group is None:
        return None
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{name}: torch.distributed is not initialised (init_process_group first), got {group!r}")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name}: expected a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    return group


def feature_maps(student_name: str, student, teacher_name: str, teacher):
    """Feature maps (B, C_s, *spatial) and (B, C_t, *spatial): at least 3 dims, C >= 1, the
    same batch and spatial dims (channels may differ), one device."""
    tensor(student_name, student)
    tensor(teacher_name, teacher)
    for name, x in ((student_name, student), (teacher_name, teacher)):
        if x.dim() < 3:
            raise ValueError(f"{name}: expected shape (B, C, *spatial) with at least 3 dims, "
                             f"got {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError(f"{name}: expected C >= 1 channels (dim 1), got shape {tuple(x.shape)}")
    if teacher.dim() != student.dim() or teacher.shape[0] != student.shape[0] or (
            teacher.shape[2:] != student.shape[2:]):
        want = (student.shape[0], "C") + tuple(student.shape[2:])
        raise ValueError(f"{teacher_name}: expected shape {want} (the batch and spatial dims of "
                         f"{student_name}, shape {tuple(student.shape)}), got {tuple(teacher.shape)}")
    same_device(teacher_name, teacher, student_name, student)


def embeddings(student_name: str, student, teacher_name: str, teacher, *, min_batch: int):
    """Embeddings (B, ...) of at least 2 dims, the same B >= min_batch, at least one feature
    per sample (the feature shapes may differ), one device."""
    tensor(student_name, student)
    tensor(teacher_name, teacher)
    for name, x in ((student_name, student), (teacher_name, teacher)):
        if x.dim() < 2:
            raise ValueError(f"{name}: expected shape (B, D) or (B, ...) with at least 2 dims, "
                             f"got {tuple(x.shape)}")
    if teacher.shape[0] != student.shape[0]:
        raise ValueError(f"{teacher_name}: expected batch size {student.shape[0]} (that of "
                         f"{student_name}), got shape {tuple(teacher.shape)}")
    if student.shape[0] < min_batch:
        raise ValueError(f"{student_name}: expected a batch of B >= {min_batch} samples, got shape "
                         f"{tuple(student.shape)}")
    for name, x in ((student_name, student), (teacher_name, teacher)):
        if math.prod(x.shape[1:]) == 0:
            raise ValueError(f"{name}: expected at least one feature per sample, got shape "
                             f"{tuple(x.shape)}")
    same_device(teacher_name, teacher, student_name, student)


def attention_inputs(names, student_q, student_k, teacher_q, teacher_k):
    """Queries and keys of both models, each (B, H, L, d) on one device: one B and L for all,
    the same number of query heads H in both models, key heads dividing them (grouped-query
    attention), each model's keys of its queries' head dim d >= 1 and dtype."""
    sq_name, sk_name, tq_name, tk_name = names
    for name, x in zip(names, (student_q, student_k, teacher_q, teacher_k)):
        tensor(name, x)
        if x.dim() != 4:
            raise ValueError(f"{name}: expected shape (B, H, L, d), got {tuple(x.shape)}")
    batch, heads, length = student_q.shape[:3]
    if teacher_q.shape[0] != batch or teacher_q.shape[2] != length:
        raise ValueError(f"{tq_name}: expected shape ({batch}, H, {length}, d) (B and L of {sq_name}, "
                         f"shape {tuple(student_q.shape)}), got {tuple(teacher_q.shape)}")
    if teacher_q.shape[1] != heads:
        raise ValueError(f"{tq_name}: expected {heads} heads (those of {sq_name}: the maps are compared "
                         f"head by head), got {teacher_q.shape[1]}; relation_kd_loss compares models "
                         "with different head counts")
    for q_name, q, k_name, k in ((sq_name, student_q, sk_name, student_k), (tq_name, teacher_q, tk_name, teacher_k)):
        if q.shape[3] == 0:
            raise ValueError(f"{q_name}: expected a head dim d >= 1, got shape {tuple(q.shape)}")
        if k.shape[0] != batch or k.shape[2] != length or k.shape[3] != q.shape[3]:
            raise ValueError(f"{k_name}: expected shape ({batch}, H_k, {length}, {q.shape[3]}) (B, L and d "
                             f"of {q_name}, shape {tuple(q.shape)}), got {tuple(k.shape)}")
        if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
            raise ValueError(f"{k_name}: expected a number of heads dividing {q.shape[1]} (the heads of "
                             f"{q_name}; grouped-query attention), got {k.shape[1]}")
        if k.dtype != q.dtype:
            raise TypeError(f"{k_name}: expected dtype {q.dtype} (that of {q_name}), got {k.dtype}")
    for name, x in ((sk_name, student_k), (tq_name, teacher_q), (tk_name, teacher_k)):
        same_device(name, x, sq_name, student_q)


def attention_mask(name: str, mask, batch: int, length: int, ref_name: str, ref: torch.Tensor):
    """None, or a (B, L) bool / integer key-padding mask, 1 (True) = attend, 0 = padding
    (Hugging Face's ``attention_mask``). Float masks are refused: an additive mask (0 = attend,
    a large negative number = padding) would be read the other way round. Values in {0, 1}
    are checked for CPU tensors only (a GPU check would synchronise)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"{name}: expected a bool or integer tensor of 0 / 1 (1 = attend, as Hugging "
                        f"Face's attention_mask), got {mask.dtype}; an additive float mask must be "
                        "converted first (e.g. mask == 0)")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"{name}: expected shape ({batch}, {length}) (B and L of {ref_name}), got "
                         f"{tuple(mask.shape)}")
    same_device(name, mask, ref_name, ref)
    if mask.device.type == "cpu" and mask.dtype != torch.bool and mask.numel() > 0 and not _compiling():
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            raise ValueError(f"{name}: expected values 0 or 1, got {int(mask[bad][0])}")
    return mask

"""Batching store items for training, and decoding the compact form on the device."""
from __future__ import annotations

import numbers

import torch

from . import format as fmt

_DENSE = ("teacher_ids", "teacher_logprobs")
_COMPACT_INT16_PAD = -1        # int16 bit pattern of the code 65535 (-inf)


class OfflineCollator:
    """Pads store items (:func:`pydistill.offline.open_store`) into a training batch::

        input_ids            int64 (B, L)        padded with pad_token_id (right padding)
        attention_mask       int64 (B, L)        1 on tokens, 0 on padding (not with packing)
        labels               int64 (B, L)        input_ids with padding as ignore_index; the
                                                 model shifts them (transformers' convention),
                                                 so teacher entries at t pair with label t + 1
        teacher_ids          int64 (B, L, K)     padding: id 0
        teacher_logprobs     float32 (B, L, K)   padding: -inf
        teacher_counts       int64 (B, L, K)     method="sample" (padding 0)
        teacher_log_weights  float32 (B, L, K)   when the store has them (padding 0)
        teacher_temperature  float               the temperature the log-probs are at
        teacher_method       str                 "topk" | "sample"

    ``teacher_temperature`` / ``teacher_method`` come from the items (a store puts the
    manifest's values in every item); items that disagree are refused, and items without them
    need the collator's ``teacher_temperature`` / ``teacher_method`` arguments: the loss must
    never guess the temperature the teacher was stored at.

    ``packing=True`` concatenates the batch into one row (B = 1) with ``position_ids``
    restarting at 0 for each sequence and the first label of every sequence set to
    ``ignore_index`` (so no position is trained to predict the next sequence's first token);
    there is no ``attention_mask`` then, as in transformers' ``DataCollatorWithFlattening``:
    the model's attention must honour ``position_ids`` (flash_attention_2, or sdpa /
    flex attention with packed-sequence support).

    Items read with ``open_store(path, compact=True)`` stay compact: ``teacher_ids_packed``
    uint8 (B, L, ceil(K * b / 8)) and ``teacher_codes`` int16 (B, L, K) (or ``teacher_counts``)
    plus ``teacher_id_bits`` / ``teacher_k`` / ``teacher_samples``; move only these bytes to
    the GPU and call :func:`decode` there (about 4.3 bytes per entry at K = 64, V = 151,936,
    instead of 12 for int64 ids and float32 log-probs).

    Dense log-probs are validated (``validate=True``): an entry above 0, or a position whose
    logsumexp is above 0, by more than 1/64 nat is refused with a ValueError (raw logits stored
    by mistake are caught here).
    """

    def __init__(self, pad_token_id=0, ignore_index=-100, packing=False, *,
                 teacher_temperature=None, teacher_method=None, validate=True):
        for name, v in (("pad_token_id", pad_token_id), ("ignore_index", ignore_index)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
        if not isinstance(packing, bool):
            raise TypeError(f"packing: expected a bool, got {type(packing).__name__}")
        if teacher_method not in (None, "topk", "sample"):
            raise ValueError(f"teacher_method: expected None, 'topk' or 'sample', got {teacher_method!r}")
        if teacher_temperature is not None and not (
                isinstance(teacher_temperature, numbers.Real) and teacher_temperature > 0):
            raise ValueError(f"teacher_temperature: expected None or a number > 0, got {teacher_temperature!r}")
        self.pad_token_id, self.ignore_index, self.packing = int(pad_token_id), int(ignore_index), packing
        self.teacher_temperature, self.teacher_method = teacher_temperature, teacher_method
        self.validate = validate

    def _scalar(self, items, key, default):
        values = {it[key] for it in items if key in it}
        if len(values) > 1:
            raise ValueError(f"{key}: expected every item of a batch to agree, got {sorted(values)}")
        if values:
            value = values.pop()
            if default is not None and value != default:
                raise ValueError(f"{key}: the items say {value!r}, the collator was given {default!r}")
            return value
        if default is None:
            raise ValueError(f"{key}: the items carry none (not read from a store) and the "
                             f"collator was given none; pass OfflineCollator({key}=...)")
        return default

    def __call__(self, items):
        if not isinstance(items, (list, tuple)) or not items:
            raise ValueError(f"items: expected a non-empty list of store items, got {items!r}"[:200])
        for n, it in enumerate(items):
            if not isinstance(it, dict) or "input_ids" not in it:
                raise TypeError(f"items[{n}]: expected a dict with 'input_ids', got {type(it).__name__}")
        compact = "teacher_ids_packed" in items[0]
        keys = _keys(items[0], compact)
        for n, it in enumerate(items):
            if _keys(it, compact) != keys:
                raise ValueError(f"items[{n}]: expected the keys {sorted(keys)} (those of items[0]), "
                                 f"got {sorted(_keys(it, compact))}")
        temperature = float(self._scalar(items, "teacher_temperature", self.teacher_temperature))
        method = self._scalar(items, "teacher_method", self.teacher_method)
        seqs = [torch.as_tensor(it["input_ids"], dtype=torch.int64).reshape(-1) for it in items]
        lengths = [s.numel() for s in seqs]
        tensors = {}
        for key in keys:
            vals = [torch.as_tensor(it[key]) for it in items]
            for n, (v, L) in enumerate(zip(vals, lengths)):
                if v.dim() != 2 or v.shape[0] != L or v.shape[1] != vals[0].shape[1]:
                    raise ValueError(f"items[{n}]['{key}']: expected shape ({L}, "
                                     f"{vals[0].shape[1]}) (input_ids' length, that of items[0]), "
                                     f"got {tuple(v.shape)}")
            tensors[key] = vals
        if self.validate and "teacher_logprobs" in tensors:
            for n, v in enumerate(tensors["teacher_logprobs"]):
                fmt.check_logprobs(f"items[{n}]['teacher_logprobs']", v)
        pads = {"teacher_ids": 0, "teacher_logprobs": float("-inf"), "teacher_counts": 0,
                "teacher_log_weights": 0.0, "teacher_ids_packed": 0,
                "teacher_codes": _COMPACT_INT16_PAD}
        dtypes = {"teacher_ids": torch.int64, "teacher_logprobs": torch.float32,
                  "teacher_counts": torch.int64, "teacher_log_weights": torch.float32,
                  "teacher_ids_packed": torch.uint8, "teacher_codes": torch.int16}
        batch = {}
        if self.packing:
            batch["input_ids"] = torch.cat(seqs)[None]
            labels = [s.clone() for s in seqs]
            for lab in labels:
                lab[:1] = self.ignore_index
            batch["labels"] = torch.cat(labels)[None]
            batch["position_ids"] = torch.cat([torch.arange(L) for L in lengths])[None]
            for key, vals in tensors.items():
                batch[key] = torch.cat([v.to(dtypes[key]) for v in vals])[None]
        else:
            B, L = len(items), max(lengths)
            ids = torch.full((B, L), self.pad_token_id, dtype=torch.int64)
            mask = torch.zeros((B, L), dtype=torch.int64)
            for b, s in enumerate(seqs):
                ids[b, :s.numel()] = s
                mask[b, :s.numel()] = 1
            batch["input_ids"], batch["attention_mask"] = ids, mask
            batch["labels"] = ids.masked_fill(mask == 0, self.ignore_index)
            for key, vals in tensors.items():
                out = torch.full((B, L, vals[0].shape[1]), pads[key], dtype=dtypes[key])
                for b, v in enumerate(vals):
                    out[b, :v.shape[0]] = v.to(dtypes[key])
                batch[key] = out
        batch["teacher_temperature"] = temperature
        batch["teacher_method"] = method
        if compact:
            batch["teacher_id_bits"] = int(self._scalar(items, "teacher_id_bits", None))
            batch["teacher_k"] = int(self._scalar(items, "teacher_k", None))
            if "teacher_counts" in tensors:
                batch["teacher_samples"] = int(self._scalar(items, "teacher_samples", None))
        return batch


def _keys(item, compact):
    names = ("teacher_ids_packed", "teacher_codes", "teacher_counts", "teacher_log_weights") \
        if compact else ("teacher_ids", "teacher_logprobs", "teacher_counts", "teacher_log_weights")
    keys = frozenset(k for k in names if k in item)
    if compact:
        return keys
    missing = [k for k in _DENSE if k not in item]
    if missing:
        raise ValueError(f"items: expected the keys {list(_DENSE)}, an item lacks {missing}")
    return keys


def decode(batch: dict, device=None) -> dict:
    """Unpack a compact batch (:class:`OfflineCollator` of ``open_store(..., compact=True)``
    items) on ``device``: only the packed ids (b bits each) and the uint16 codes / counts are
    copied there; ids, log-probs and the -inf padding are rebuilt with torch integer ops on the
    device. A dense batch is moved to ``device`` as is. Returns a new dict."""
    out = {}
    for key, v in batch.items():
        out[key] = v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and device is not None else v
    if "teacher_ids_packed" not in out:
        return out
    k, bits = out.pop("teacher_k"), out.pop("teacher_id_bits")
    samples = out.pop("teacher_samples", None)
    out["teacher_ids"] = fmt.unpack_ids(out.pop("teacher_ids_packed"), k, bits)
    if "teacher_codes" in out:
        out["teacher_logprobs"] = fmt.codes_to_logprobs(out.pop("teacher_codes"))
    else:
        out["teacher_counts"] = out["teacher_counts"].to(torch.int64)
        out["teacher_logprobs"] = fmt.counts_to_logprobs(out["teacher_counts"], samples)
    return out

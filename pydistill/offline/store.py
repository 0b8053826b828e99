"""Writing and reading a teacher store: Parquet shards plus ``manifest.json``.

A store is a folder::

    manifest.json                       what was captured, how it is encoded (see MANIFEST_KEYS)
    shard-r0000-000000.parquet          rank 0's first shard_size sequences, ...
    shard-r0001-000000.parquet          rank 1's (one set of shards per torch.distributed rank)

Each Parquet row is one sequence (zstd-compressed columns; row groups of at most
``row_group_size`` sequences and about ``row_group_bytes`` stored bytes, for random access):

    sequence_index       int64            the sequence's position in the capture's input
    input_ids            list<int32>      (L,) the tokens (padding removed)
    teacher_ids          binary           L positions x ceil(K * b / 8) bytes (format.pack_ids)
    teacher_codes        binary           method="topk": quantised log-probs (format.encode_codes)
    teacher_counts       binary           method="sample": L x K counts (uint8 / uint16 LE)
    teacher_log_weights  binary           method="sample" with proposal_temperature !=
                                          temperature only: L x K float16, log p_T - log r

The manifest is also embedded in every shard's Parquet metadata (key ``pydistill``), so one
shard read alone is self-describing. Everything except the three binary columns is plain
Parquet that pandas / pyarrow / DuckDB / ``datasets`` read as is.
"""
from __future__ import annotations

import bisect
import json
import math
import os
import re
from collections import OrderedDict

import numpy as np
import torch

from . import format as fmt

MANIFEST = "manifest.json"
_SHARD_RE = re.compile(r"^shard-r(\d+)-(\d+)\.parquet$")
# what must agree between a store on disk and a capture resuming into it
_RESUME_KEYS = ("format_version", "method", "k", "vocab_size", "temperature", "samples",
                "proposal_temperature", "teacher", "shard_size")


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without pyarrow
        raise ImportError("pydistill.offline stores are Parquet files: pip install pyarrow "
                          '(or "pydistill-kernels[offline]")') from e
    return pyarrow


def shard_name(rank: int, index: int) -> str:
    return f"shard-r{rank:04d}-{index:06d}.parquet"


def make_manifest(*, vocab_size, k, temperature, method, samples=None, proposal_temperature=None,
                  teacher=None, teacher_revision=None, tokenizer_fingerprint=None,
                  shard_size=1024, extra=None) -> dict:
    from .._version import __version__
    m = {
        "format": "pydistill-offline",
        "format_version": fmt.FORMAT_VERSION,
        "method": method,
        "k": k,
        "vocab_size": vocab_size,
        "temperature": temperature,
        "samples": samples,
        "proposal_temperature": proposal_temperature,
        "teacher": teacher,
        "teacher_revision": teacher_revision,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "id_bits": fmt.id_bits(vocab_size),
        "logprob_encoding": (
            f"x = -log_p; code = round({fmt.CODE_SCALE} x) for x <= {fmt.BREAK_NATS}, else "
            f"{fmt.BREAK_CODE} + round({fmt.TAIL_SCALE} (x - {fmt.BREAK_NATS})); uint16, 65535 = -inf"
            if method == "topk" else "count of each drawn id; log(count / samples)"),
        # the bound for every log-prob >= -9.25 (so every p >= 1e-4), and the one below
        "logprob_max_error": fmt.QUANT_ERROR if method == "topk" else 0.0,
        "logprob_tail_max_error": fmt.TAIL_QUANT_ERROR if method == "topk" else 0.0,
        "compression": "zstd",
        "shard_size": shard_size,
        "pydistill_version": __version__,
    }
    if extra:
        m.update(extra)
    return m


def _check_method(method, k, samples, temperature, proposal_temperature, vocab_size=None):
    if method not in ("topk", "sample"):
        raise ValueError(f"method: expected 'topk' or 'sample', got {method!r}")
    for name, v in (("temperature", temperature), ("proposal_temperature", proposal_temperature)):
        if v is None and name == "proposal_temperature":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name}: expected a finite number > 0, got {v!r}")
    if method == "sample":
        if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= 65535:
            raise ValueError(f"samples: expected an int in [1, 65535] for method='sample', got {samples!r}")
        if vocab_size is not None and k != min(samples, vocab_size):
            raise ValueError(f"k: expected min(samples, vocab_size) = {min(samples, vocab_size)} "
                             f"for method='sample' (one slot per possible distinct draw), got {k}")
    elif samples is not None:
        raise ValueError(f"samples: expected None for method='topk', got {samples!r}")


class StoreWriter:
    """Writes sequences into a store folder; :func:`pydistill.offline.capture` and the
    converters use it, and so can hand-built stores.

    Sequences are numbered in the order they are given (this rank's stream); sequence ``n``
    goes to shard ``n // shard_size``. A shard file appears (atomically, by rename) only when
    it is complete, or at :meth:`close` for the last one, so a run that stops midway loses at
    most one shard, and a new writer on the same folder skips what is on disk:
    :meth:`finished` says whether sequence ``n``'s shard already exists, and :meth:`add` drops
    sequences of finished shards.

    Log-probs given to :meth:`add` are validated (:func:`format.check_logprobs`): an entry or a
    row's logsumexp above 0 beyond rounding is refused with a ValueError.
    """

    def __init__(self, out, *, vocab_size, k, temperature=1.0, method="topk", samples=None,
                 proposal_temperature=None, teacher=None, teacher_revision=None,
                 tokenizer_fingerprint=None, shard_size=1024, row_group_size=64,
                 row_group_bytes=2 ** 20, rank=0, extra_manifest=None):
        self._pa = _pyarrow()
        fmt.id_bits(vocab_size)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab_size:
            raise ValueError(f"k: expected an int in [1, vocab_size={vocab_size}], got {k!r}")
        _check_method(method, k, samples, temperature, proposal_temperature, vocab_size)
        if method == "sample" and proposal_temperature is None:
            proposal_temperature = temperature
        for name, v in (("shard_size", shard_size), ("row_group_size", row_group_size),
                        ("row_group_bytes", row_group_bytes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        self.out = os.fspath(out)
        self.k, self.vocab_size, self.method, self.samples = k, vocab_size, method, samples
        self.bits = fmt.id_bits(vocab_size)
        self.weighted = method == "sample" and proposal_temperature != temperature
        self.shard_size, self.row_group_size, self.rank = shard_size, row_group_size, rank
        self.row_group_bytes = row_group_bytes
        self.manifest = make_manifest(
            vocab_size=vocab_size, k=k, temperature=float(temperature), method=method,
            samples=samples, proposal_temperature=None if proposal_temperature is None
            else float(proposal_temperature), teacher=teacher, teacher_revision=teacher_revision,
            tokenizer_fingerprint=tokenizer_fingerprint, shard_size=shard_size,
            extra=extra_manifest)
        os.makedirs(self.out, exist_ok=True)
        path = os.path.join(self.out, MANIFEST)
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            for key in _RESUME_KEYS:
                if old.get(key) != self.manifest.get(key):
                    raise ValueError(
                        f"out: {self.out!r} holds a store with {key}={old.get(key)!r}, this capture "
                        f"has {key}={self.manifest.get(key)!r}; resume with the same settings or "
                        f"choose another folder")
        _atomic_write_text(path, json.dumps(self.manifest, indent=2, sort_keys=True))
        self._count = 0            # sequences of this rank's stream seen so far
        self._rows = []
        self.written = []          # shard files written by this writer

    def finished(self, n: int) -> bool:
        """Whether sequence n of this rank's stream lies in a shard already on disk."""
        return os.path.exists(os.path.join(self.out, shard_name(self.rank, n // self.shard_size)))

    @property
    def count(self) -> int:
        return self._count

    def skip(self, n: int = 1) -> None:
        """Count n sequences as seen without storing them (they lie in finished shards)."""
        for _ in range(n):
            if not self.finished(self._count):
                raise ValueError(f"skip: sequence {self._count} lies in an unfinished shard")
            self._count += 1

    def add(self, input_ids, teacher_ids, teacher_logprobs=None, *, teacher_counts=None,
            teacher_log_weights=None, sequence_index=None) -> None:
        """Append one sequence: ``input_ids`` (L,), ``teacher_ids`` (L, K) sorted per position by
        decreasing log-prob (count), and ``teacher_logprobs`` (L, K) (method='topk') or
        ``teacher_counts`` (L, K) (method='sample'; ``teacher_log_weights`` (L, K) too when the
        proposal temperature differs). Unused slots: id 0 with log-prob -inf / count 0."""
        n = self._count
        self._count += 1
        if self.finished(n):
            return
        ids = _as_tensor("input_ids", input_ids).reshape(-1)
        L = ids.numel()
        tid = _as_tensor("teacher_ids", teacher_ids)
        if tid.dim() != 2 or tid.shape != (L, self.k):
            raise ValueError(f"teacher_ids: expected shape ({L}, {self.k}) (positions, k), got "
                             f"{tuple(tid.shape)}")
        if tid.is_floating_point():
            raise TypeError(f"teacher_ids: expected an integer tensor, got {tid.dtype}")
        if L and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"input_ids: expected ids in [0, {self.vocab_size}), got "
                             f"[{ids.min().item()}, {ids.max().item()}]")
        if L and (tid.min() < 0 or tid.max() >= self.vocab_size):
            raise ValueError(f"teacher_ids: expected ids in [0, {self.vocab_size}), got "
                             f"[{tid.min().item()}, {tid.max().item()}]")
        row = {"sequence_index": n if sequence_index is None else int(sequence_index),
               "input_ids": ids.to(torch.int32).numpy(),
               "teacher_ids": fmt.pack_ids(tid.numpy(), self.bits).tobytes()}
        if self.method == "topk":
            if teacher_logprobs is None:
                raise ValueError("teacher_logprobs: expected an (L, K) tensor for method='topk', got None")
            lp = _as_tensor("teacher_logprobs", teacher_logprobs)
            if lp.shape != tid.shape:
                raise ValueError(f"teacher_logprobs: expected shape {tuple(tid.shape)} (that of "
                                 f"teacher_ids), got {tuple(lp.shape)}")
            fmt.check_logprobs("teacher_logprobs", lp)
            lp = lp.double().clamp(max=0.0)
            if L and (lp[:, 1:] > lp[:, :-1]).any():
                raise ValueError("teacher_logprobs: expected each position's entries sorted by "
                                 "decreasing log-prob (as torch.topk returns them), got an "
                                 "increase")
            row["teacher_codes"] = fmt.encode_codes(fmt.logprobs_to_codes(lp.numpy()))
        else:
            if teacher_counts is None:
                raise ValueError("teacher_counts: expected an (L, K) tensor for method='sample', got None")
            c = _as_tensor("teacher_counts", teacher_counts)
            if c.shape != tid.shape:
                raise ValueError(f"teacher_counts: expected shape {tuple(tid.shape)}, got {tuple(c.shape)}")
            if L and (c.min() < 0 or (c.sum(-1) != self.samples).any()):
                raise ValueError(f"teacher_counts: expected non-negative counts summing to "
                                 f"samples={self.samples} at every position, got sums in "
                                 f"[{c.sum(-1).min().item()}, {c.sum(-1).max().item()}]")
            row["teacher_counts"] = c.numpy().astype(fmt.count_dtype(self.samples)).tobytes()
            if self.weighted:
                if teacher_log_weights is None:
                    raise ValueError("teacher_log_weights: expected an (L, K) tensor (proposal "
                                     "temperature != temperature), got None")
                w = _as_tensor("teacher_log_weights", teacher_log_weights)
                row["teacher_log_weights"] = w.float().numpy().astype("<f2").tobytes()
        self._rows.append(row)
        if (n + 1) % self.shard_size == 0:
            self._flush(n // self.shard_size)

    def close(self) -> None:
        """Write the last (possibly short) shard."""
        if self._rows:
            self._flush((self._count - 1) // self.shard_size)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()

    def _flush(self, index: int) -> None:
        pa = self._pa
        import pyarrow.parquet as pq
        rows, self._rows = self._rows, []
        cols = {
            "sequence_index": pa.array([r["sequence_index"] for r in rows], pa.int64()),
            "input_ids": pa.array([r["input_ids"] for r in rows], pa.list_(pa.int32())),
            "teacher_ids": pa.array([r["teacher_ids"] for r in rows], pa.binary()),
        }
        for key in ("teacher_codes", "teacher_counts", "teacher_log_weights"):
            if key in rows[0]:
                cols[key] = pa.array([r[key] for r in rows], pa.binary())
        table = pa.table(cols).replace_schema_metadata(
            {"pydistill": json.dumps(self.manifest, sort_keys=True)})
        path = os.path.join(self.out, shard_name(self.rank, index))
        tmp = path + f".tmp{os.getpid()}"
        # row groups: at most row_group_size sequences and about row_group_bytes of stored bytes,
        # so that random access (store[i]) decompresses little besides the row it wants
        sizes = [sum(len(v) for k, v in r.items() if k.startswith("teacher_")) + 4 * len(r["input_ids"])
                 for r in rows]
        with pq.ParquetWriter(tmp, table.schema, compression="zstd", compression_level=9,
                              use_dictionary=False) as pw:
            start = 0
            while start < len(rows):
                stop, acc = start, 0
                while stop < len(rows) and stop - start < self.row_group_size and (
                        stop == start or acc + sizes[stop] <= self.row_group_bytes):
                    acc += sizes[stop]
                    stop += 1
                pw.write_table(table.slice(start, stop - start), row_group_size=stop - start)
                start = stop
        os.replace(tmp, path)
        self.written.append(path)


def _atomic_write_text(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _as_tensor(name, x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, (list, tuple)):
        return torch.tensor(x)
    raise TypeError(f"{name}: expected a tensor, array or list, got {type(x).__name__}")


class OfflineStore(torch.utils.data.Dataset):
    """A teacher store read back: map-style (``len``, ``store[i]``) and streaming (``iter``).

    ``store[i]`` is a dict::

        input_ids            int64 (L,)
        teacher_ids          int64 (L, K)       sorted by decreasing log-prob / count
        teacher_logprobs     float32 (L, K)     log p at the manifest's temperature (topk;
                                                within 1/128 nat), or log(count / samples)
                                                (sample); unused slots: id 0, -inf
        teacher_counts       int64 (L, K)       method="sample" only
        teacher_log_weights  float32 (L, K)     method="sample" with a proposal temperature
                                                other than the temperature: log p_T - log r
        teacher_temperature  float              the manifest's temperature
        teacher_method       str                the manifest's method
        sequence_index       int                the sequence's position in the capture's input

    Position t's teacher entries predict token t + 1 (as a causal LM's logits at t do).
    Sequences are ordered by rank, then shard, then row. With ``compact=True`` the item holds
    the stored bytes instead of ``teacher_ids`` / ``teacher_logprobs``: ``teacher_ids_packed``
    uint8 (L, ceil(K * b / 8)) and ``teacher_codes`` int16 (L, K) (uint16 bit patterns;
    method="topk") or ``teacher_counts``; :class:`OfflineCollator` pads them and
    :func:`decode` unpacks them on the training device.

    Reading caches the last few decoded Parquet row groups (``cache_row_groups``); the object
    pickles without its open files, so DataLoader workers can share it.
    """

    def __init__(self, path, *, compact=False, cache_row_groups=4):
        pa = _pyarrow()
        import pyarrow.parquet as pq
        self.path = os.fspath(path)
        self.compact = bool(compact)
        self.cache_row_groups = cache_row_groups
        if os.path.isdir(self.path):
            files = sorted(f for f in os.listdir(self.path) if _SHARD_RE.match(f))
            files = [os.path.join(self.path, f) for f in files]
            mpath = os.path.join(self.path, MANIFEST)
            manifest = None
            if os.path.exists(mpath):
                with open(mpath) as f:
                    manifest = json.load(f)
        elif os.path.isfile(self.path):
            files, manifest = [self.path], None
        else:
            raise ValueError(f"path: expected a store folder or a shard file, got {self.path!r} "
                             "(does not exist)")
        if manifest is None:
            if not files:
                raise ValueError(f"path: expected a store ({MANIFEST} and shard-*.parquet files), "
                                 f"got a folder without either: {self.path!r}")
            meta = pq.read_schema(files[0]).metadata or {}
            if b"pydistill" not in meta:
                raise ValueError(f"path: {files[0]!r} is not a pydistill store shard (no "
                                 "'pydistill' metadata)")
            manifest = json.loads(meta[b"pydistill"])
        if manifest.get("format_version") != fmt.FORMAT_VERSION:
            raise ValueError(f"path: expected a store of format_version {fmt.FORMAT_VERSION}, got "
                             f"{manifest.get('format_version')!r}")
        self.manifest = manifest
        self.k = int(manifest["k"])
        self.bits = int(manifest["id_bits"])
        self.width = fmt.packed_width(self.k, self.bits)
        self.files = files
        self._groups = []      # (file index, row group, first row)
        self._starts = []
        total = 0
        for fi, f in enumerate(files):
            md = pq.ParquetFile(f).metadata
            for g in range(md.num_row_groups):
                self._groups.append((fi, g))
                self._starts.append(total)
                total += md.row_group(g).num_rows
        self._len = total
        self._cache = OrderedDict()
        self._handles = {}
        del pa

    def __len__(self):
        return self._len

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"], state["_handles"] = OrderedDict(), {}
        return state

    def _group(self, gi):
        if gi in self._cache:
            self._cache.move_to_end(gi)
            return self._cache[gi]
        import pyarrow.parquet as pq
        fi, g = self._groups[gi]
        if fi not in self._handles:
            self._handles[fi] = pq.ParquetFile(self.files[fi])
        table = self._handles[fi].read_row_group(g)
        table = {name: table.column(name).combine_chunks() for name in table.column_names}
        self._cache[gi] = table
        while len(self._cache) > max(1, self.cache_row_groups):
            self._cache.popitem(last=False)
        return table

    def __getitem__(self, i):
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"index: expected an int, got {type(i).__name__}")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index: expected an int in [{-n}, {n}), got {i}")
        i = int(i) % n
        gi = bisect.bisect_right(self._starts, i) - 1
        return self._row(self._group(gi), i - self._starts[gi])

    def __iter__(self):
        for gi in range(len(self._groups)):
            table = self._group(gi)
            for r in range(len(table["sequence_index"])):
                yield self._row(table, r)

    def _row(self, table, r):
        row = {}
        for key, col in table.items():
            if key == "input_ids":   # the row's slice of the flat values, no Python list
                a, b = col.offsets[r].as_py(), col.offsets[r + 1].as_py()
                row[key] = col.values.slice(a, b - a).to_numpy(zero_copy_only=False)
            else:
                row[key] = col[r].as_py()
        return decode_row(row, self.manifest, compact=self.compact)


def decode_row(row: dict, manifest: dict, *, compact=False) -> dict:
    """One Parquet row of a store (a dict of its columns, as pyarrow's ``to_pylist`` or a
    ``datasets`` streaming dataset yields it) -> the item :class:`OfflineStore` returns.

    For ``datasets`` users: ``load_dataset("parquet", data_files=shards, streaming=True)``,
    ``split_dataset_by_node`` across ranks, then ``.map(functools.partial(decode_row,
    manifest=store.manifest))`` (with ``remove_columns`` of the binary columns)."""
    m = manifest
    K, bits = int(m["k"]), int(m["id_bits"])
    width = fmt.packed_width(K, bits)
    ids = torch.as_tensor(np.asarray(row["input_ids"], dtype=np.int64))
    L = ids.numel()
    packed = np.frombuffer(row["teacher_ids"], dtype=np.uint8)
    if packed.size != L * width:
        raise ValueError(f"teacher_ids: expected {L * width} bytes for {L} positions, "
                         f"got {packed.size} (corrupt shard?)")
    packed = torch.from_numpy(packed.copy()).reshape(L, width)
    item = {"input_ids": ids}
    if m["method"] == "topk":
        codes = fmt.decode_codes(row["teacher_codes"], L, K)
        if compact:
            item["teacher_ids_packed"] = packed
            item["teacher_codes"] = torch.from_numpy(codes.view(np.int16).copy())
        else:
            item["teacher_ids"] = fmt.unpack_ids(packed, K, bits)
            item["teacher_logprobs"] = fmt.codes_to_logprobs(torch.from_numpy(codes.view(np.int16)))
    else:
        counts = np.frombuffer(row["teacher_counts"],
                               dtype=fmt.count_dtype(m["samples"])).reshape(L, K)
        counts = torch.from_numpy(counts.astype(np.int64))
        item["teacher_counts"] = counts
        if compact:
            item["teacher_ids_packed"] = packed
        else:
            item["teacher_ids"] = fmt.unpack_ids(packed, K, bits)
            item["teacher_logprobs"] = fmt.counts_to_logprobs(counts, m["samples"])
        if row.get("teacher_log_weights") is not None:
            w = np.frombuffer(row["teacher_log_weights"], dtype="<f2").reshape(L, K)
            item["teacher_log_weights"] = torch.from_numpy(w.astype(np.float32))
    if compact:
        item["teacher_id_bits"], item["teacher_k"] = bits, K
        if m["method"] == "sample":
            item["teacher_samples"] = int(m["samples"])
    item["teacher_temperature"] = float(m["temperature"])
    item["teacher_method"] = m["method"]
    item["sequence_index"] = int(row["sequence_index"])
    return item


def open_store(path, *, compact=False, cache_row_groups=4) -> OfflineStore:
    """Open a store written by :func:`pydistill.offline.capture` (a folder, or one shard file).

    Returns an :class:`OfflineStore`: ``len(store)``, ``store[i]`` (map-style, random access
    through a small row-group cache), ``for item in store`` (streaming, one row group in memory
    at a time) and ``store.manifest``. ``compact=True`` keeps the teacher entries as the stored
    bytes for :func:`decode` on the training device."""
    return OfflineStore(path, compact=compact, cache_row_groups=cache_row_groups)

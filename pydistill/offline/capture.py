"""Capture a teacher's next-token distribution once, into a store (and ``pydistill-capture``)."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import torch

from .store import StoreWriter, _check_method

# logits of one row chunk are (chunk, V) float32: 256 MiB by default
_CHUNK_BYTES = 256 * 2 ** 20


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id, sorted) and special tokens: equal for
    two tokenizers that map every string to the same ids; stored in the manifest so a student
    trained on another tokenizer can be refused."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    special = sorted(map(str, getattr(tokenizer, "all_special_tokens", []) or []))
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


class _Teacher:
    """The teacher as (final hidden states, output embedding): a transformers causal LM, or a
    callable ``f(input_ids, attention_mask) -> (hidden (B, L, H), weight (V, H)[, bias (V,)])``."""

    def __init__(self, teacher):
        self.module = teacher if isinstance(teacher, torch.nn.Module) else None
        self.softcap = self.logit_scale = None
        self.name = self.revision = None
        if self.module is not None and hasattr(teacher, "get_output_embeddings"):
            head = teacher.get_output_embeddings()
            if head is None or not hasattr(head, "weight"):
                raise TypeError("teacher: expected a causal LM with an output embedding "
                                "(get_output_embeddings()), got none")
            # the decoder stack (final norm included) whose output the head multiplies;
            # get_decoder also reaches through wrappers such as a PEFT model
            body = teacher.get_decoder() if hasattr(teacher, "get_decoder") else None
            if body is None or body is teacher:
                body = getattr(teacher, getattr(teacher, "base_model_prefix", "model"), None)
            if body is None or body is teacher:
                raise TypeError(f"teacher: expected a causal LM whose decoder gives the final "
                                f"hidden states (get_decoder()), got {type(teacher).__name__}")
            self.body = body
            self.head = head
            config = getattr(teacher, "config", None)
            self.softcap = getattr(config, "final_logit_softcapping", None)
            self.logit_scale = getattr(config, "logit_scale", None)
            self.name = getattr(config, "_name_or_path", None) or type(teacher).__name__
            self.revision = getattr(config, "_commit_hash", None)
        elif callable(teacher):
            self.body = None
        else:
            raise TypeError(f"teacher: expected a transformers causal LM or a callable returning "
                            f"(hidden, weight[, bias]), got {type(teacher).__name__}")
        self.fn = teacher
        self._w32 = None

    @property
    def device(self):
        if self.module is not None:
            for p in self.module.parameters():
                return p.device
        return torch.device("cpu")

    def __call__(self, input_ids, attention_mask):
        if self.body is not None:
            out = self.body(input_ids=input_ids, attention_mask=attention_mask)
            hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
            weight, bias = self.head.weight, getattr(self.head, "bias", None)
        else:
            res = self.fn(input_ids, attention_mask)
            if not isinstance(res, (tuple, list)) or len(res) not in (2, 3):
                raise TypeError("teacher: a callable teacher must return (hidden, weight) or "
                                f"(hidden, weight, bias), got {type(res).__name__}")
            hidden, weight, bias = (*res, None)[:3]
        return hidden, weight, bias

    def logits(self, h, weight, bias):
        """Float32 logits of a row chunk: the head is applied in float32 (a float32 copy of a
        lower-precision head is kept for the capture: V x H x 4 bytes)."""
        if self._w32 is None or self._w32[0] is not weight:
            self._w32 = (weight, weight.detach().float(), None if bias is None else bias.detach().float())
        z = torch.nn.functional.linear(h.float(), self._w32[1], self._w32[2])
        if self.logit_scale is not None:
            z = z * float(self.logit_scale)
        if self.softcap is not None:
            z = float(self.softcap) * torch.tanh(z / float(self.softcap))
        return z


def _batches(batches, batch_size):
    """Yields (input_ids (B, L) int64, attention_mask (B, L), items of ``batches`` consumed)
    from batch dicts / tensors or single sequences (grouped into batches of batch_size,
    right-padded)."""
    pending = []
    consumed = [0]

    def flush():
        L = max(len(s) for s in pending)
        ids = torch.zeros((len(pending), L), dtype=torch.int64)
        mask = torch.zeros((len(pending), L), dtype=torch.int64)
        for b, s in enumerate(pending):
            ids[b, :len(s)] = s
            mask[b, :len(s)] = 1
        pending.clear()
        n, consumed[0] = consumed[0], 0
        return ids, mask, n

    for n, item in enumerate(batches):
        consumed[0] += 1
        mask = None
        if isinstance(item, dict):
            if "input_ids" not in item:
                raise ValueError(f"batches[{n}]: expected a dict with 'input_ids', got keys {sorted(item)}")
            ids, mask = item["input_ids"], item.get("attention_mask")
        else:
            ids = item
        ids = torch.as_tensor(ids)
        if ids.is_floating_point() or ids.dim() not in (1, 2):
            raise ValueError(f"batches[{n}]: expected token ids of shape (L,) or (B, L), integer, "
                             f"got shape {tuple(ids.shape)} {ids.dtype}")
        if ids.dim() == 1:
            if mask is not None:
                ids = ids[torch.as_tensor(mask).bool().reshape(-1)]
            pending.append(ids.to(torch.int64))
            if len(pending) == batch_size:
                yield flush()
            continue
        if pending:
            consumed[0] -= 1
            yield flush()
            consumed[0] = 1
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
        if mask.shape != ids.shape:
            raise ValueError(f"batches[{n}]['attention_mask']: expected shape {tuple(ids.shape)} "
                             f"(that of input_ids), got {tuple(mask.shape)}")
        consumed[0] = 0
        yield ids.to(torch.int64), mask.to(torch.int64), 1
    if pending:
        yield flush()


def _sample_counts(proposal_probs, samples, generator):
    """Draw `samples` ids per row from proposal_probs (C, V); returns distinct ids and their
    counts (C, samples), sorted by count (desc) then id, unused slots id 0 / count 0."""
    draws = torch.multinomial(proposal_probs, samples, replacement=True, generator=generator)
    d, _ = draws.sort(dim=1)
    new = torch.ones_like(d, dtype=torch.bool)
    new[:, 1:] = d[:, 1:] != d[:, :-1]
    group = new.long().cumsum(1) - 1
    counts = torch.zeros_like(d).scatter_add_(1, group, torch.ones_like(d))
    ids = torch.zeros_like(d).scatter_(1, group, d)
    key = torch.where(counts > 0, ids - counts * (1 << 26), torch.zeros_like(ids))
    order = key.argsort(dim=1)
    return ids.gather(1, order), counts.gather(1, order)


def capture(teacher, batches, out, *, k=64, temperature=1.0, method="topk", samples=None,
            proposal_temperature=None, chunk_size=None, shard_size=1024, progress=True,
            batch_size=8, tokenizer=None, teacher_name=None, teacher_revision=None, seed=0,
            split_across_ranks=True, row_group_size=64):
    """Run ``teacher`` over ``batches`` once and store its next-token distributions in ``out``.

    For every token position t of every sequence (padding excluded), with z the teacher's
    logits at t (the prediction of token t + 1):

    * ``method="topk"``: the k largest entries of ``log_softmax(z / temperature)`` and their
      ids, sorted, stored within 1/128 nat (:mod:`pydistill.offline.format`);
    * ``method="sample"``: ``samples`` ids (default k; k is then set to min(samples, V),
      the most distinct ids there can be) drawn
      with replacement from ``softmax(z / proposal_temperature)`` (default: ``temperature``),
      stored as the distinct ids with their counts, so that ``count / samples`` is an unbiased
      estimate of the proposal (Sparse Logit Sampling, Anshumann et al. 2025). When the
      proposal temperature differs from ``temperature``, ``log p_T - log r`` of each drawn id is
      stored too (``teacher_log_weights``: importance weights towards the tempered teacher).

    ``teacher``: a transformers causal LM (its base model gives the final hidden states, its
    output embedding the logits; ``final_logit_softcapping`` and ``logit_scale`` in its config
    are applied), or a callable ``f(input_ids, attention_mask) -> (hidden (B, L, H), weight
    (V, H)[, bias])``. Logits are formed ``chunk_size`` positions at a time in float32 (default:
    as many as fit 256 MiB), so (N, V) float32 never exists for the whole batch. The forward
    runs on the teacher's device under ``torch.inference_mode``; sampling uses a generator
    seeded from (``seed``, rank, batch number), so a resumed capture draws the same ids.

    ``batches``: an iterable of dicts with ``input_ids`` (B, L) and optionally
    ``attention_mask`` (positions with mask 0 are not stored), or of single sequences (a
    ``datasets`` dataset of {"input_ids": [...]} rows, lists of ids, 1-D tensors), which are
    grouped ``batch_size`` at a time. Under ``torch.distributed`` (initialised, world size > 1)
    every rank is expected to pass the same ``batches``; rank r takes batches r, r + W, ...
    (``split_across_ranks=False``: each rank captures all it is given) and writes its own
    shards (``shard-r<rank>-<n>.parquet``).

    Resumable: shard n of a rank holds that rank's sequences ``[n * shard_size, (n + 1) *
    shard_size)`` and appears only when complete; a capture into a folder that has some shards
    skips the teacher forward for batches whose sequences all lie in finished shards. Settings
    must match the folder's manifest (else ValueError).

    Returns a dict: ``out``, ``sequences`` and ``tokens`` captured by this call, ``skipped``
    (sequences in finished shards), ``shards`` (files written), ``manifest``.
    """
    if method == "sample":
        samples = k if samples is None else samples
        k = samples
        proposal_temperature = temperature if proposal_temperature is None else proposal_temperature
    elif proposal_temperature is not None:
        raise ValueError(f"proposal_temperature: expected None for method='topk', got {proposal_temperature!r}")
    _check_method(method, k, samples, temperature, proposal_temperature)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size: expected None or an int >= 1, got {chunk_size!r}")
    t = _Teacher(teacher)
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    world_split = world if split_across_ranks else 1
    device = t.device
    writer = None
    total = None
    try:
        total = len(batches)
    except TypeError:
        pass
    bar = None
    if progress and rank == 0:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, desc="pydistill-capture", unit="item")
        except ImportError:
            bar = None
    was_training = t.module.training if t.module is not None else None
    if t.module is not None:
        t.module.eval()
    n_seq = n_tok = skipped = 0
    global_index = 0
    try:
        with torch.inference_mode():
            for b, (ids, mask, consumed) in enumerate(_batches(batches, batch_size)):
                if bar is not None:
                    bar.update(consumed)
                first_global = global_index
                global_index += ids.shape[0]
                if b % world_split != rank % world_split:
                    continue
                hidden = None
                if writer is None:
                    if t.body is not None:
                        vocab = t.head.weight.shape[0]
                    else:   # a callable teacher: its head is known after a forward
                        hidden, weight, bias = t(ids.to(device), mask.to(device))
                        vocab = weight.shape[0]
                    if method == "sample":
                        k = min(samples, vocab)   # distinct draws: at most V
                    if k > vocab:
                        raise ValueError(f"k: expected at most the teacher's vocabulary size {vocab}, got {k}")
                    fp = tokenizer_fingerprint(tokenizer) if tokenizer is not None else None
                    writer = StoreWriter(
                        out, vocab_size=vocab, k=k, temperature=temperature, method=method,
                        samples=samples, proposal_temperature=proposal_temperature,
                        teacher=teacher_name or t.name, teacher_revision=teacher_revision or t.revision,
                        tokenizer_fingerprint=fp, shard_size=shard_size,
                        row_group_size=row_group_size, rank=rank)
                    C = chunk_size or max(1, _CHUNK_BYTES // (4 * vocab))
                B = ids.shape[0]
                start = writer.count
                if all(writer.finished(start + i) for i in range(B)):
                    writer.skip(B)
                    skipped += B
                    continue
                if not mask.any():      # empty sequences only: nothing to run the teacher on
                    for i_seq in range(B):
                        n_seq += not writer.finished(writer.count)
                        e = torch.zeros((0, k), dtype=torch.int64)
                        writer.add(ids[i_seq, :0], e, e.float() if method == "topk" else None,
                                   teacher_counts=None if method == "topk" else e,
                                   teacher_log_weights=e.float(),
                                   sequence_index=first_global + i_seq)
                    continue
                if hidden is None:
                    hidden, weight, bias = t(ids.to(device), mask.to(device))
                sel = mask.to(device).bool()
                h = hidden[sel]                       # (N, H): stored positions only
                tops, idxs, cnts, wts = [], [], [], []
                gen = None
                if method == "sample":
                    gen = torch.Generator(device=h.device)
                    gen.manual_seed((seed * 1_000_003 + rank) * 1_000_003 + b)
                for c in range(0, h.shape[0], C):
                    z = t.logits(h[c:c + C], weight, bias)
                    lp = torch.log_softmax(z / temperature, dim=-1)
                    if method == "topk":
                        v, i = lp.topk(k, dim=-1)
                        tops.append(v.cpu())
                        idxs.append(i.cpu())
                    else:
                        if proposal_temperature == temperature:
                            lr = lp
                        else:
                            lr = torch.log_softmax(z / proposal_temperature, dim=-1)
                        i, n = _sample_counts(lr.exp(), samples, gen)
                        i, n = i[:, :k], n[:, :k]         # used slots come first
                        idxs.append(i.cpu())
                        cnts.append(n.cpu())
                        if proposal_temperature != temperature:
                            w = (lp.gather(1, i) - lr.gather(1, i)).masked_fill(n == 0, 0.0)
                            wts.append(w.cpu())
                    del z, lp
                empty = torch.zeros((0, k), dtype=torch.int64)
                idx = torch.cat(idxs) if idxs else empty
                top = torch.cat(tops) if tops else empty.float()
                cnt = torch.cat(cnts) if cnts else empty
                wt = torch.cat(wts) if wts else None
                lengths = mask.bool().sum(1).tolist()
                flat_ids = ids[mask.bool()]
                offs = 0
                for i_seq, L in enumerate(lengths):
                    sl = slice(offs, offs + L)
                    offs += L
                    kw = {"sequence_index": first_global + i_seq}
                    if method == "topk":
                        kw["teacher_logprobs"] = top[sl]
                    else:
                        kw["teacher_counts"] = cnt[sl]
                        if wt is not None:
                            kw["teacher_log_weights"] = wt[sl]
                    if writer.finished(writer.count):
                        skipped += 1
                    else:
                        n_seq += 1
                        n_tok += L
                    writer.add(flat_ids[sl], idx[sl], **kw)
                hidden = None
        if writer is not None:
            writer.close()
    finally:
        if bar is not None:
            bar.close()
        if was_training:
            t.module.train()
    if global_index == 0:
        raise ValueError("batches: expected at least one sequence, got none")
    # a rank that got no batch (fewer batches than ranks) writes nothing
    return {"out": os.fspath(out), "sequences": n_seq, "tokens": n_tok, "skipped": skipped,
            "shards": [] if writer is None else list(writer.written),
            "manifest": None if writer is None else dict(writer.manifest)}


def _load_sequences(path, column):
    """Token-id sequences from a .jsonl / .json / .parquet / .arrow / .pt file or a
    ``datasets.save_to_disk`` folder."""
    if os.path.isdir(path):
        import datasets
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[next(iter(ds))]
        return ds[column] if column in ds.column_names else _fail(path, column)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    elif ext == ".json":
        with open(path) as f:
            rows = json.load(f)
    elif ext in (".parquet", ".arrow", ".feather"):
        import pyarrow.feather
        import pyarrow.parquet as pq
        table = pq.read_table(path) if ext == ".parquet" else pyarrow.feather.read_table(path)
        if column not in table.column_names:
            _fail(path, column)
        return table.column(column).to_pylist()
    elif ext == ".pt":
        rows = torch.load(path)
        if isinstance(rows, torch.Tensor):
            return list(rows)
    else:
        raise SystemExit(f"pydistill-capture: {path}: expected a .jsonl, .json, .parquet, "
                         ".arrow, .pt file or a datasets folder")
    return [r[column] if isinstance(r, dict) else r for r in rows]


def _fail(path, column):
    raise SystemExit(f"pydistill-capture: {path}: no column {column!r}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="pydistill-capture",
        description="Run a transformers causal LM over token-id sequences once and store its "
                    "top-k (or sampled) next-token log-probs for offline distillation "
                    "(pydistill.offline.open_store reads the result).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="a transformers model folder or hub name (from_pretrained)")
    p.add_argument("data", help="token ids: .jsonl / .json rows with the column, .parquet, "
                                ".arrow, .pt (list or 2-D tensor), or a datasets.save_to_disk folder")
    p.add_argument("--out", required=True, help="the store folder (created; resumed if it exists)")
    p.add_argument("--column", default="input_ids")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--method", choices=("topk", "sample"), default="topk")
    p.add_argument("--samples", type=int, default=None, help="draws per position (method sample; default k)")
    p.add_argument("--proposal-temperature", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None, help="truncate sequences to this many tokens")
    p.add_argument("--chunk-size", type=int, default=None, help="positions per float32 logits chunk")
    p.add_argument("--shard-size", type=int, default=1024, help="sequences per shard")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--revision", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        p.error('needs transformers: pip install "pydistill-kernels[examples]"')
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, revision=args.revision)
    model.to(device)
    try:
        tok = AutoTokenizer.from_pretrained(args.model, revision=args.revision)
    except Exception:  # a model folder without a tokenizer: no fingerprint
        tok = None
    seqs = _load_sequences(args.data, args.column)
    if args.max_length is not None:
        seqs = [s[:args.max_length] for s in seqs]
    res = capture(model, seqs, args.out, k=args.k, temperature=args.temperature,
                  method=args.method, samples=args.samples,
                  proposal_temperature=args.proposal_temperature, chunk_size=args.chunk_size,
                  shard_size=args.shard_size, progress=not args.no_progress,
                  batch_size=args.batch_size, tokenizer=tok, teacher_revision=args.revision,
                  seed=args.seed)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"pydistill-capture: {res['sequences']} sequences, {res['tokens']} tokens captured "
          f"({res['skipped']} already stored) into {args.out} ({size / 2 ** 20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

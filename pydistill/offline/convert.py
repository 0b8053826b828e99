"""Stores from an inference engine's prompt log-probs (vLLM, SGLang), no teacher run here.

Both engines report, for prompt position t >= 1, the top log-probs of the distribution that
predicted token t (computed at position t - 1), and nothing for position 0. A store's position
t holds the prediction of token t + 1 (what a causal LM's logits at t are trained on), so entry
t + 1 of the engine's list becomes the store's position t, and the store's last position, whose
prediction the engine does not report, holds empty slots (id 0, log-prob -inf): the collator's
shifted labels never train on it.

The engines report log-probs of the model's own distribution; pass ``temperature=`` if they were
computed at another temperature (vLLM's ``logprobs_mode`` / SGLang's options); nothing
re-tempers them. Values that cannot be log-probs (an entry above 0 or a position summing above
1, beyond rounding: e.g. raw logits) are refused with a ValueError.
"""
from __future__ import annotations

import math

import torch

from .store import StoreWriter


def _get(obj, name):
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def _rows(name, positions, k):
    """per-position [(token_id, logprob)] -> (L, k) ids and log-probs, the store's alignment."""
    L = len(positions)
    ids = torch.zeros((L, k), dtype=torch.int64)
    lps = torch.full((L, k), float("-inf"), dtype=torch.float64)
    for t in range(L - 1):
        entries = positions[t + 1]
        if entries is None:
            raise ValueError(f"{name}[{t + 1}]: expected the top log-probs of prompt position "
                             f"{t + 1}, got None (only position 0 may be None)")
        entries = sorted(entries, key=lambda e: (-e[1], e[0]))[:k]
        for j, (tok, lp) in enumerate(entries):
            if not isinstance(tok, int) or isinstance(tok, bool):
                raise TypeError(f"{name}[{t + 1}]: expected int token ids, got {type(tok).__name__}")
            if lp is None or (isinstance(lp, float) and math.isnan(lp)):
                raise ValueError(f"{name}[{t + 1}]: expected a log-prob for token {tok}, got {lp!r}")
            ids[t, j], lps[t, j] = tok, float(lp)
    return ids, lps


def _infer_k(name, requests, k, prompt_token_added):
    """k given, or the N the engine was asked for: the most entries any position has (SGLang), or,
    when the engine adds the prompt token to positions where it is outside the top N (vLLM), the
    most entries any position has besides the prompt token."""
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected None or an int >= 1, got {k!r}")
        return k
    sizes = [len([e for e in entries if not (prompt_token_added and e[0] == ids[t])])
             for ids, positions in requests for t, entries in enumerate(positions)
             if t > 0 and entries is not None]
    if not sizes or max(sizes) == 0:
        raise ValueError(f"{name}: expected at least one position with top log-probs to infer k "
                         "from; pass k=")
    return max(sizes)


def _write(name, requests, out, *, vocab_size, k, temperature, shard_size, teacher,
           tokenizer_fingerprint, prompt_token_added):
    requests = list(requests)
    k = _infer_k(name, requests, k, prompt_token_added)
    writer = StoreWriter(out, vocab_size=vocab_size, k=k, temperature=temperature,
                         method="topk", teacher=teacher, tokenizer_fingerprint=tokenizer_fingerprint,
                         shard_size=shard_size, extra_manifest={"source": name})
    with writer:
        for r, (input_ids, positions) in enumerate(requests):
            if len(positions) != len(input_ids):
                raise ValueError(f"{name}: request {r}: expected one entry per prompt token "
                                 f"({len(input_ids)}), got {len(positions)}")
            ids, lps = _rows(f"{name}: request {r}: positions", positions, k)
            try:
                writer.add(torch.as_tensor(list(input_ids), dtype=torch.int64), ids, lps,
                           sequence_index=r)
            except ValueError as e:
                raise ValueError(f"{name}: request {r}: {e}") from None
    return out


def from_vllm_prompt_logprobs(outputs, out, *, vocab_size, k=None, temperature=1.0,
                              shard_size=1024, teacher=None, tokenizer_fingerprint=None):
    """Write vLLM ``RequestOutput`` objects (``LLM.generate(..., SamplingParams(
    prompt_logprobs=N))``) into a top-k store at ``out``; returns ``out``.

    Assumed structure, per output (attributes, or keys of a dict):

    * ``prompt_token_ids``: list[int], the L prompt tokens;
    * ``prompt_logprobs``: a list of L entries; entry 0 is None, entry t a
      ``dict[token_id, Logprob]`` where ``Logprob`` has ``.logprob`` (float; ``.rank`` and
      ``.decoded_token`` are not needed; a plain float is accepted too): the N most likely
      tokens at position t, plus the actual prompt token when it is not among them.

    ``k``: entries kept per position, the most likely first; default: the most entries any
    position has besides its prompt token (= N as soon as one prompt token lies outside its
    position's top N; N - 1 in the rare case where every prompt token is inside: pass ``k=N``
    to be sure). The prompt-token entry vLLM adds is the (N + 1)-th most likely, so keeping k = N
    drops it. Positions with fewer than k entries are padded with (id 0, -inf). ``vocab_size`` is
    the model's (vLLM does not report it)."""
    def requests():
        for n, o in enumerate(outputs):
            ids, plp = _get(o, "prompt_token_ids"), _get(o, "prompt_logprobs")
            if ids is None or plp is None:
                raise ValueError(f"outputs[{n}]: expected prompt_token_ids and prompt_logprobs "
                                 "(SamplingParams(prompt_logprobs=N)), got None")
            positions = [None]
            for t, d in enumerate(plp):
                if t == 0:
                    continue
                if d is None:
                    positions.append(None)
                    continue
                if not isinstance(d, dict):
                    raise TypeError(f"outputs[{n}].prompt_logprobs[{t}]: expected a dict "
                                    f"{{token_id: Logprob}}, got {type(d).__name__}")
                positions.append([(tok, v if isinstance(v, (int, float)) else _get(v, "logprob"))
                                  for tok, v in d.items()])
            yield list(ids), positions
    return _write("from_vllm_prompt_logprobs", requests(), out, vocab_size=vocab_size, k=k,
                  temperature=temperature, shard_size=shard_size, teacher=teacher,
                  tokenizer_fingerprint=tokenizer_fingerprint, prompt_token_added=True)


def from_sglang(outputs, out, *, vocab_size, k=None, temperature=1.0, input_ids=None,
                shard_size=1024, teacher=None, tokenizer_fingerprint=None):
    """Write SGLang generate results (``return_logprob=True, top_logprobs_num=N,
    logprob_start_len=0``) into a top-k store at ``out``; returns ``out``.

    Assumed structure, per output (a dict, as ``Engine.generate`` / the HTTP API return):
    ``output["meta_info"]["input_top_logprobs"]``: a list of L entries, one per prompt token;
    entry 0 is None, entry t a list of ``(logprob, token_id, text)`` tuples (text may be None):
    the N most likely tokens at position t. The prompt ids come from ``input_ids`` (one list
    per output) or else from ``meta_info["input_token_logprobs"]`` (``(logprob, token_id,
    text)`` per prompt token). ``k``: entries kept per position, the most likely first (default:
    the most any position has, = N); fewer are padded with (id 0, -inf)."""
    def requests():
        for n, o in enumerate(outputs):
            meta = _get(o, "meta_info")
            if meta is None or meta.get("input_top_logprobs") is None:
                raise ValueError(f"outputs[{n}]: expected meta_info['input_top_logprobs'] "
                                 "(return_logprob=True, top_logprobs_num=N, logprob_start_len=0)")
            if input_ids is not None:
                ids = list(input_ids[n])
            elif meta.get("input_token_logprobs") is not None:
                ids = [e[1] for e in meta["input_token_logprobs"]]
            else:
                raise ValueError(f"outputs[{n}]: expected input_ids= or "
                                 "meta_info['input_token_logprobs'] for the prompt's token ids")
            positions = [None]
            for t, entries in enumerate(meta["input_top_logprobs"]):
                if t == 0:
                    continue
                positions.append(None if entries is None else
                                 [(e[1], e[0]) for e in entries])
            yield ids, positions
    return _write("from_sglang", requests(), out, vocab_size=vocab_size, k=k,
                  temperature=temperature, shard_size=shard_size, teacher=teacher,
                  tokenizer_fingerprint=tokenizer_fingerprint, prompt_token_added=False)

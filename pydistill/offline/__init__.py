"""Offline distillation: capture a teacher once, store it compactly, train from the store.

    from pydistill.offline import capture, open_store, OfflineCollator

    capture(teacher, sequences, "store/", k=64, temperature=1.0)     # or pydistill-capture
    store = open_store("store/")                                      # len, [i], iteration
    loader = DataLoader(store, batch_size=8, collate_fn=OfflineCollator(pad_token_id=0))

* :func:`capture` runs a transformers causal LM (or a hidden-states + head callable) and keeps,
  per token position, the top-k log-probs of ``log_softmax(z / temperature)`` and their ids, or
  (``method="sample"``) ids drawn from the teacher with their counts (an unbiased estimate);
* :mod:`~pydistill.offline.format` documents the encoding: ids in ceil(log2 V) bits,
  log-probs in 1/64-nat steps (error <= 1/128 nat), Parquet shards compressed with zstd;
* :func:`open_store` reads a store back as a map-style / streaming dataset with ``.manifest``;
* :class:`OfflineCollator` pads items into a batch that carries the stored temperature and
  method to the loss; with ``open_store(..., compact=True)`` only the packed bytes cross to the
  GPU and :func:`decode` unpacks them there;
* :func:`from_vllm_prompt_logprobs` / :func:`from_sglang` convert an inference engine's prompt
  log-probs into a store.
"""
from .capture import capture, tokenizer_fingerprint
from .collate import OfflineCollator, decode
from .convert import from_sglang, from_vllm_prompt_logprobs
from .format import FORMAT_VERSION, QUANT_ERROR, check_logprobs
from .store import OfflineStore, StoreWriter, decode_row, open_store

__all__ = ["capture", "open_store", "OfflineStore", "OfflineCollator", "decode", "StoreWriter",
           "decode_row",
           "from_vllm_prompt_logprobs", "from_sglang", "check_logprobs", "tokenizer_fingerprint",
           "FORMAT_VERSION", "QUANT_ERROR"]

"""pydistill.offline: capture -> store -> read, on tiny transformers models built from configs.

Round trips are judged against torch.topk of the teacher's own tempered log_softmax (its forward
logits), within the format's stated bound (format.error_bound: 1/128 nat for log p >= -9.25, so
for every p >= 1e-4; 1/16 nat below), ids exact."""
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch

from pydistill.offline import (OfflineCollator, QUANT_ERROR, StoreWriter, capture, decode,
                               from_sglang, from_vllm_prompt_logprobs, open_store,
                               tokenizer_fingerprint)
from pydistill.offline import format as fmt
from pydistill.bench.bench_offline import zipf_teacher_topk

pytest.importorskip("pyarrow")
transformers = pytest.importorskip("transformers")

V = 128


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():   # a peakier head than the random init: distributions far from uniform
        model.lm_head.weight.mul_(20)
    return model


@pytest.fixture(scope="module")
def sequences():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, V, (int(n),), generator=g)
            for n in torch.randint(2, 24, (11,), generator=g)]


def _teacher_logprobs(teacher, ids, temperature):
    with torch.no_grad():
        z = teacher(input_ids=ids[None]).logits[0].double()
    return torch.log_softmax(z / temperature, dim=-1)


# ---------------------------------------------------------------------------------- format


@pytest.mark.parametrize("vocab", [2, 3, 128, 151936, 2 ** 25])
@pytest.mark.parametrize("k", [1, 7, 64])
def test_ids_pack_unpack_exact(vocab, k):
    if k > vocab:
        pytest.skip("k > V")
    g = torch.Generator().manual_seed(vocab + k)
    ids = torch.randint(0, vocab, (37, k), generator=g)
    ids[0] = vocab - 1
    bits = fmt.id_bits(vocab)
    assert bits == max(1, math.ceil(math.log2(vocab)))
    packed = fmt.pack_ids(ids.numpy(), bits)
    assert packed.shape == (37, (k * bits + 7) // 8)
    out = fmt.unpack_ids(torch.from_numpy(packed).reshape(37, 1, -1), k, bits)
    assert torch.equal(out.reshape(37, k), ids)


def test_codes_error_bound():
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(8 * torch.randn(64, 300, generator=g, dtype=torch.float64), -1)
    lp[1, :4] = torch.tensor([-9.2103, -9.25, -9.2578, -9.27])   # around the break
    lp = lp.sort(dim=-1, descending=True).values
    lp[:, -3:] = float("-inf")
    lp[0, -4] = -9000.0                         # below the codes' range: stored as -8127
    codes = fmt.logprobs_to_codes(lp.numpy())
    assert (np.diff(codes.astype(np.int64), axis=1) >= 0).all()      # monotone per position
    back = fmt.codes_to_logprobs(torch.from_numpy(
        fmt.decode_codes(fmt.encode_codes(codes), 64, 300).view(np.int16))).double()
    finite = lp > fmt.MIN_LOGPROB
    err = (back - lp)[finite].abs()
    assert (err <= fmt.error_bound(lp[finite]) + 1e-6).all()
    fine = finite & (lp >= math.log(1e-4))
    assert fine.sum() > 1000 and (back - lp)[fine].abs().max() <= QUANT_ERROR + 1e-9
    tail = finite & (lp < -fmt.BREAK_NATS)
    assert tail.sum() > 1000 and err.max() <= fmt.TAIL_QUANT_ERROR + 1e-9
    assert torch.isneginf(back[:, -3:]).all()
    assert back[0, -4] == pytest.approx(fmt.MIN_LOGPROB)


# --------------------------------------------------------------------------------- capture


@pytest.mark.parametrize("temperature, chunk_size", [(1.0, None), (0.7, 5), (2.0, 1)])
def test_capture_topk_round_trip(tmp_path, teacher, sequences, temperature, chunk_size):
    res = capture(teacher, sequences, tmp_path, k=8, temperature=temperature,
                  chunk_size=chunk_size, shard_size=4, batch_size=3, progress=False)
    assert res["sequences"] == len(sequences) and res["skipped"] == 0
    assert res["tokens"] == sum(len(s) for s in sequences)
    store = open_store(tmp_path)
    assert len(store) == len(sequences)
    for i, item in enumerate(store):
        assert item["sequence_index"] == i
        assert torch.equal(item["input_ids"], sequences[i])
        ref = _teacher_logprobs(teacher, sequences[i], temperature).topk(8, dim=-1)
        assert item["teacher_ids"].dtype == torch.int64 and item["teacher_logprobs"].dtype == torch.float32
        assert torch.equal(item["teacher_ids"], ref.indices)
        err = (item["teacher_logprobs"].double() - ref.values).abs()
        assert (err <= fmt.error_bound(ref.values) + 1e-5).all()
        assert item["teacher_temperature"] == temperature and item["teacher_method"] == "topk"


def test_capture_callable_teacher_dict_batches_left_padding(tmp_path, teacher, sequences):
    """A (hidden, weight, bias) callable; batch dicts whose attention_mask 0 positions (here
    left padding) are not stored."""
    bias = torch.linspace(-1, 1, V)

    def fn(input_ids, attention_mask):
        out = teacher.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state, teacher.lm_head.weight, bias

    a, b = sequences[0], sequences[1]
    L = max(len(a), len(b))
    ids = torch.zeros((2, L), dtype=torch.int64)
    mask = torch.zeros((2, L), dtype=torch.int64)
    ids[0, L - len(a):], mask[0, L - len(a):] = a, 1
    ids[1, L - len(b):], mask[1, L - len(b):] = b, 1
    capture(fn, [{"input_ids": ids, "attention_mask": mask}], tmp_path, k=5, progress=False)
    store = open_store(tmp_path)
    assert store.manifest["teacher"] is None and store.manifest["vocab_size"] == V
    for row, s in enumerate((a, b)):
        item = store[row]
        assert torch.equal(item["input_ids"], s)
        with torch.no_grad():
            h = fn(ids[row:row + 1], mask[row:row + 1])[0][0, mask[row].bool()]
        ref = torch.log_softmax(h.double() @ teacher.lm_head.weight.double().T + bias.double(), -1)
        ref = ref.topk(5, dim=-1)
        assert torch.equal(item["teacher_ids"], ref.indices)
        err = (item["teacher_logprobs"].double() - ref.values).abs()
        assert (err <= fmt.error_bound(ref.values) + 1e-5).all()


def test_capture_peft_teacher(tmp_path, teacher, sequences):
    """A LoRA-wrapped teacher: its decoder is reached through the PEFT wrapper, adapters on."""
    peft = pytest.importorskip("peft")
    import copy
    wrapped = peft.get_peft_model(copy.deepcopy(teacher),
                                  peft.LoraConfig(target_modules=["q_proj"], r=2))
    for name, param in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    capture(wrapped, sequences[:2], tmp_path, k=4, progress=False)
    for item, seq in zip(open_store(tmp_path), sequences):
        with torch.no_grad():
            ref = torch.log_softmax(wrapped(input_ids=seq[None]).logits[0].double(), -1).topk(4)
        plain = _teacher_logprobs(teacher, seq, 1.0).topk(4)
        assert not torch.allclose(ref.values, plain.values, atol=0.1)   # the adapter matters
        assert torch.equal(item["teacher_ids"], ref.indices)
        assert ((item["teacher_logprobs"] - ref.values).abs() <= fmt.error_bound(ref.values) + 1e-5).all()


def test_capture_sample_counts(tmp_path, teacher, sequences):
    capture(teacher, sequences[:3], tmp_path, method="sample", samples=12, temperature=1.5,
            progress=True, batch_size=2)
    store = open_store(tmp_path)
    m = store.manifest
    assert (m["method"], m["samples"], m["k"], m["proposal_temperature"], m["temperature"]) == \
        ("sample", 12, 12, 1.5, 1.5)
    for item in store:
        c, ids, lp = item["teacher_counts"], item["teacher_ids"], item["teacher_logprobs"]
        assert c.shape == ids.shape == (len(item["input_ids"]), 12)
        assert (c.sum(-1) == 12).all()
        assert (c[:, 1:] <= c[:, :-1]).all()                      # sorted by count
        used = c > 0
        assert (ids[~used] == 0).all() and torch.isneginf(lp[~used]).all()
        assert torch.allclose(lp[used], torch.log(c[used].float() / 12))
        for row, u in zip(ids, used):                              # distinct drawn ids
            assert len(set(row[u].tolist())) == int(u.sum())
        assert "teacher_log_weights" not in item


def test_capture_sample_is_drawn_from_the_tempered_teacher(tmp_path, teacher, sequences):
    """4096 draws per position: the empirical distribution is the teacher's softmax(z / T')
    within a few standard errors; the stored log weights are log p_T - log r of each id."""
    S, T, Tp = 4096, 1.0, 2.0
    capture(teacher, sequences[:1], tmp_path, method="sample", samples=S, temperature=T,
            proposal_temperature=Tp, progress=False)
    item = open_store(tmp_path)[0]
    ids, c = item["teacher_ids"], item["teacher_counts"]
    r = _teacher_logprobs(teacher, item["input_ids"], Tp).exp()
    emp = torch.zeros_like(r).scatter_add_(1, ids, c.double()) / S
    assert (emp - r).abs().max() < 5 * math.sqrt(0.25 / S)
    lw = _teacher_logprobs(teacher, item["input_ids"], T) - r.log()
    used = c > 0
    # float16 storage of the weight: |w| < 16, relative 2**-11
    assert (item["teacher_log_weights"][used].double() - lw.gather(1, ids)[used]).abs().max() < 1e-2


def test_capture_resume_skips_finished_shards(tmp_path, teacher, sequences):
    calls, fail_at = [], [3]

    class Failing(torch.nn.Module):
        """The teacher as a callable that fails on its third forward, like a preempted job."""

        def forward(self, input_ids, attention_mask):
            calls.append(input_ids.shape[0])
            if len(calls) == fail_at[0]:
                raise RuntimeError("preempted")
            out = teacher.model(input_ids=input_ids, attention_mask=attention_mask)
            return out.last_hidden_state, teacher.lm_head.weight

    with pytest.raises(RuntimeError, match="preempted"):
        capture(Failing(), sequences, tmp_path, k=4, shard_size=4, batch_size=2, progress=False)
    # batches of 2: the first two batches are shard 0 (sequences 0-3), written before the failure
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".parquet")) == \
        ["shard-r0000-000000.parquet"]
    first = tmp_path / "shard-r0000-000000.parquet"
    mtime = first.stat().st_mtime_ns
    calls.clear()
    fail_at[0] = None
    res = capture(Failing(), sequences, tmp_path, k=4, shard_size=4, batch_size=2, progress=False)
    assert res["skipped"] == 4 and res["sequences"] == len(sequences) - 4
    # a callable teacher runs one forward on its first batch to learn V; shard 0's other batch
    # is skipped
    assert len(calls) == 1 + math.ceil((len(sequences) - 4) / 2)
    assert first.stat().st_mtime_ns == mtime
    resumed = open_store(tmp_path)
    fresh_dir = tmp_path / "fresh"
    capture(teacher, sequences, fresh_dir, k=4, shard_size=4, batch_size=2, progress=False)
    fresh = open_store(fresh_dir)
    assert len(resumed) == len(fresh) == len(sequences)
    for a, b in zip(resumed, fresh):
        assert torch.equal(a["teacher_ids"], b["teacher_ids"])
        assert torch.equal(a["teacher_logprobs"], b["teacher_logprobs"])
    # everything finished: a third run computes nothing (but the forward that finds V)
    calls.clear()
    res = capture(Failing(), sequences, tmp_path, k=4, shard_size=4, batch_size=2, progress=False)
    assert res["sequences"] == 0 and res["skipped"] == len(sequences) and len(calls) == 1
    # a transformers teacher needs no forward at all for finished shards
    hook = teacher.model.register_forward_hook(lambda *_: calls.append("transformers"))
    try:
        calls.clear()
        res = capture(teacher, sequences, fresh_dir, k=4, shard_size=4, batch_size=2,
                      progress=False)
    finally:
        hook.remove()
    assert res["sequences"] == 0 and res["skipped"] == len(sequences) and calls == []


def test_capture_one_shard_set_per_rank(tmp_path, teacher, sequences, monkeypatch):
    """Under torch.distributed (here: its answers stubbed, world size 3) rank r captures
    batches r, r + 3, ... into its own shard-r<r>-*.parquet; the store reads all ranks'."""
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 3)
    for rank in range(3):
        monkeypatch.setattr(dist, "get_rank", lambda *a, r=rank: r)
        capture(teacher, sequences, tmp_path, k=4, batch_size=2, shard_size=2, progress=False)
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".parquet"))
    # 11 sequences in batches of 2: batches 0..5, rank r gets batches r and r + 3
    assert files == [f"shard-r{r:04d}-{n:06d}.parquet" for r in range(3) for n in range(2)]
    store = open_store(tmp_path)
    assert sorted(it["sequence_index"] for it in store) == list(range(len(sequences)))
    for item in store:
        assert torch.equal(item["input_ids"], sequences[item["sequence_index"]])
    assert [store[i]["sequence_index"] for i in range(4)] == [0, 1, 6, 7]   # rank 0's
    # fewer batches than ranks: rank 2 gets none and writes nothing
    res = capture(teacher, sequences[:4], tmp_path / "few", k=4, batch_size=2, progress=False)
    assert res["sequences"] == 0 and res["shards"] == [] and res["manifest"] is None


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_capture_empty_sequences(tmp_path, teacher, method):
    empty = torch.zeros(0, dtype=torch.long)
    capture(teacher, [empty, torch.tensor([3, 4]), empty, empty], tmp_path, k=4, batch_size=2,
            method=method, progress=False)
    store = open_store(tmp_path)
    assert [len(it["input_ids"]) for it in store] == [0, 2, 0, 0]
    assert store[2]["teacher_ids"].shape == store[2]["teacher_logprobs"].shape == (0, 4)
    batch = OfflineCollator()([store[i] for i in range(4)])
    assert batch["teacher_ids"].shape == (4, 2, 4)
    assert (batch["labels"][[0, 2, 3]] == -100).all()


def test_capture_resume_with_other_settings_refused(tmp_path, teacher, sequences):
    capture(teacher, sequences[:2], tmp_path, k=4, progress=False)
    with pytest.raises(ValueError, match="k=4.*k=8"):
        capture(teacher, sequences[:2], tmp_path, k=8, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        capture(teacher, sequences[:2], tmp_path, k=4, temperature=2.0, progress=False)


def test_manifest(tmp_path, teacher, sequences):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"t{i}": i for i in range(V)}
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(
        tokenizers.models.WordLevel(vocab, unk_token="t0")))
    capture(teacher, sequences[:2], tmp_path, k=6, temperature=0.5, tokenizer=tok,
            teacher_name="tiny-llama", teacher_revision="abc123", progress=False)
    with open(tmp_path / "manifest.json") as f:
        m = json.load(f)
    assert m == open_store(tmp_path).manifest
    assert m["teacher"] == "tiny-llama" and m["teacher_revision"] == "abc123"
    assert m["vocab_size"] == V and m["k"] == 6 and m["temperature"] == 0.5
    assert m["method"] == "topk" and m["samples"] is None and m["proposal_temperature"] is None
    assert m["format_version"] == fmt.FORMAT_VERSION and m["id_bits"] == 7
    assert m["logprob_max_error"] == QUANT_ERROR and m["logprob_tail_max_error"] == 1 / 16
    assert m["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    other = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(
        tokenizers.models.WordLevel({**vocab, "t1": 2, "t2": 1}, unk_token="t0")))
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)
    # every shard carries the manifest: one shard file opens alone
    (shard,) = [f for f in os.listdir(tmp_path) if f.endswith(".parquet")]
    alone = open_store(tmp_path / shard)
    assert alone.manifest == m and len(alone) == 2


@pytest.mark.parametrize("bad, match", [
    (dict(k=0), "k: expected an int in"),
    (dict(k=V + 1), "k: expected at most"),
    (dict(method="dense"), "method: expected 'topk' or 'sample'"),
    (dict(temperature=0.0), "temperature: expected a finite number > 0"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(samples=4), "samples: expected None for method='topk'"),
    (dict(proposal_temperature=2.0), "proposal_temperature: expected None"),
    (dict(method="sample", samples=0), "samples: expected an int in"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(batch_size=0), "batch_size"),
])
def test_capture_bad_arguments(tmp_path, teacher, sequences, bad, match):
    with pytest.raises(ValueError, match=match):
        capture(teacher, sequences[:1], tmp_path, progress=False, **{"k": 4, **bad})


def test_capture_bad_batches(tmp_path, teacher):
    with pytest.raises(ValueError, match=r"batches\[0\]: expected token ids"):
        capture(teacher, [torch.randn(3)], tmp_path, k=4, progress=False)
    with pytest.raises(ValueError, match=r"batches\[0\]\['attention_mask'\]"):
        capture(teacher, [{"input_ids": torch.zeros((2, 3), dtype=torch.long),
                           "attention_mask": torch.ones((2, 4))}], tmp_path, k=4, progress=False)
    with pytest.raises(TypeError, match="teacher: expected"):
        capture(3, [[1, 2]], tmp_path, k=4, progress=False)
    with pytest.raises(ValueError, match="batches: expected at least one sequence"):
        capture(teacher, [], tmp_path, k=4, progress=False)


# -------------------------------------------------------------------------------- reading


def test_store_map_style_and_streaming_agree(tmp_path, teacher, sequences):
    capture(teacher, sequences, tmp_path, k=4, shard_size=3, progress=False)
    writer_rows = 2
    store = open_store(tmp_path, cache_row_groups=1)
    streamed = list(store)
    assert len(streamed) == len(store) == len(sequences)
    for i in (5, 0, len(sequences) - 1, 3, -1):          # random access across shards
        a, b = store[i], streamed[i]
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["teacher_ids"], b["teacher_ids"])
    with pytest.raises(IndexError, match="index"):
        store[len(sequences)]
    with pytest.raises(TypeError, match="index: expected an int"):
        store["0"]
    again = pickle.loads(pickle.dumps(store))            # DataLoader workers
    assert torch.equal(again[4]["teacher_logprobs"], store[4]["teacher_logprobs"])
    loader = torch.utils.data.DataLoader(store, batch_size=writer_rows,
                                         collate_fn=OfflineCollator())
    assert sum(b["input_ids"].shape[0] for b in loader) == len(sequences)


def test_datasets_streams_the_shards_across_ranks(tmp_path, teacher, sequences):
    """The shards are plain Parquet: `datasets` streams them, splits them by rank, and
    decode_row turns its rows into the store's items."""
    datasets = pytest.importorskip("datasets")
    from datasets.distributed import split_dataset_by_node

    from pydistill.offline import decode_row
    capture(teacher, sequences, tmp_path, k=4, shard_size=3, progress=False)
    store = open_store(tmp_path)
    files = sorted(str(p) for p in tmp_path.glob("shard-*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
    seen = []
    for rank in range(2):
        for row in split_dataset_by_node(ds, rank=rank, world_size=2):
            item = decode_row(row, store.manifest)
            ref = store[item["sequence_index"]]
            assert torch.equal(item["teacher_ids"], ref["teacher_ids"])
            assert torch.equal(item["teacher_logprobs"], ref["teacher_logprobs"])
            seen.append(item["sequence_index"])
    assert sorted(seen) == list(range(len(sequences)))


def test_row_groups_bounded_in_rows_and_bytes(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(10, V, generator=g), -1).topk(8, dim=-1)
    with StoreWriter(tmp_path, vocab_size=V, k=8, row_group_size=4, row_group_bytes=300) as w:
        for n in (10, 1, 3, 2, 2, 1, 10, 10):   # 7 B of ids + 16 B of codes + 4 B of input id a position
            w.add(torch.arange(n), lp.indices[:n], lp.values[:n])
    (shard,) = tmp_path.glob("*.parquet")
    md = pq.ParquetFile(shard).metadata
    # rows of 270, 27, 81, 54, 54, 27, 270, 270 B: groups of <= 300 B and <= 4 rows
    assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [2, 4, 1, 1]
    store = open_store(tmp_path)
    assert [len(store[i]["input_ids"]) for i in (7, 0, 3, 5, 1)] == [10, 10, 2, 1, 1]
    assert torch.equal(store[6]["teacher_ids"], lp.indices)


def test_open_store_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="path: expected a store folder or a shard file"):
        open_store(tmp_path / "missing")
    with pytest.raises(ValueError, match="path: expected a store"):
        open_store(tmp_path)


def _items(teacher, sequences, tmp_path, **kw):
    capture(teacher, sequences[:3], tmp_path, k=4, temperature=2.0, progress=False, **kw)
    return open_store(tmp_path), open_store(tmp_path, compact=True)


def test_collator_pads_with_ignore_index(tmp_path, teacher, sequences):
    store, _ = _items(teacher, sequences, tmp_path)
    items = [store[i] for i in range(3)]
    batch = OfflineCollator(pad_token_id=7, ignore_index=-5)(items)
    lengths = [len(it["input_ids"]) for it in items]
    B, L = 3, max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (B, L)
    assert batch["teacher_ids"].shape == (B, L, 4) and batch["teacher_ids"].dtype == torch.int64
    assert batch["teacher_logprobs"].dtype == torch.float32
    assert batch["teacher_temperature"] == 2.0 and batch["teacher_method"] == "topk"
    for b, (it, n) in enumerate(zip(items, lengths)):
        assert torch.equal(batch["input_ids"][b, :n], it["input_ids"])
        assert torch.equal(batch["labels"][b, :n], it["input_ids"])
        assert (batch["input_ids"][b, n:] == 7).all() and (batch["labels"][b, n:] == -5).all()
        assert (batch["attention_mask"][b, :n] == 1).all() and (batch["attention_mask"][b, n:] == 0).all()
        assert torch.equal(batch["teacher_logprobs"][b, :n], it["teacher_logprobs"])
        assert (batch["teacher_ids"][b, n:] == 0).all()
        assert torch.isneginf(batch["teacher_logprobs"][b, n:]).all()


def test_collator_packing(tmp_path, teacher, sequences):
    store, compact = _items(teacher, sequences, tmp_path)
    items = [store[i] for i in range(3)]
    batch = OfflineCollator(packing=True)(items)
    lengths = [len(it["input_ids"]) for it in items]
    T = sum(lengths)
    assert batch["input_ids"].shape == (1, T) and "attention_mask" not in batch
    assert batch["teacher_logprobs"].shape == (1, T, 4)
    starts = np.cumsum([0] + lengths[:-1])
    assert (batch["labels"][0, starts] == -100).all()
    assert torch.equal(batch["position_ids"][0], torch.cat([torch.arange(n) for n in lengths]))
    assert torch.equal(batch["teacher_ids"][0], torch.cat([it["teacher_ids"] for it in items]))
    packed = decode(OfflineCollator(packing=True)([compact[i] for i in range(3)]))
    assert torch.equal(packed["teacher_ids"], batch["teacher_ids"])
    assert torch.equal(packed["teacher_logprobs"], batch["teacher_logprobs"])


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_compact_batches_decode_to_the_dense_batch(tmp_path, teacher, sequences, method):
    kw = {"method": "sample", "samples": 4} if method == "sample" else {}
    store, compact = _items(teacher, sequences, tmp_path, **kw)
    dense = OfflineCollator()([store[i] for i in range(3)])
    small = OfflineCollator()([compact[i] for i in range(3)])
    assert small["teacher_ids_packed"].dtype == torch.uint8
    assert small["teacher_ids_packed"].shape[-1] == (4 * 7 + 7) // 8
    if method == "topk":
        assert small["teacher_codes"].dtype == torch.int16 and "teacher_logprobs" not in small
    out = decode(small, torch.device("cpu"))
    for key in ("teacher_ids", "teacher_logprobs", "input_ids", "labels", "attention_mask"):
        assert torch.equal(out[key], dense[key]), key
    assert out["teacher_temperature"] == 2.0 and out["teacher_method"] == method
    assert "teacher_ids_packed" not in out


def test_collator_refuses_what_cannot_be_logprobs():
    ids = torch.tensor([1, 2, 3])
    good = {"input_ids": ids, "teacher_ids": torch.tensor([[1, 2]] * 3),
            "teacher_logprobs": torch.log(torch.tensor([[0.6, 0.3]] * 3))}
    collate = OfflineCollator(teacher_temperature=1.0, teacher_method="topk")
    assert collate([good])["teacher_temperature"] == 1.0
    logits = dict(good, teacher_logprobs=torch.tensor([[4.0, 1.0]] * 3))
    with pytest.raises(ValueError, match=r"items\[1\]\['teacher_logprobs'\]: expected "
                                         r"log-probabilities.*got an entry of 4"):
        collate([good, logits])
    over = dict(good, teacher_logprobs=torch.log(torch.tensor([[0.7, 0.6]] * 3)))
    with pytest.raises(ValueError, match=r"logsumexp <= 0.*got a row with logsumexp 0.26"):
        collate([over])
    with pytest.raises(ValueError, match="teacher_temperature: the items carry none"):
        OfflineCollator()([good])
    with pytest.raises(ValueError, match="teacher_temperature: expected every item"):
        OfflineCollator()([dict(good, teacher_temperature=1.0, teacher_method="topk"),
                           dict(good, teacher_temperature=2.0, teacher_method="topk")])
    with pytest.raises(ValueError, match=r"items\[0\]\['teacher_ids'\]: expected shape \(3, 2\)"):
        collate([dict(good, teacher_ids=torch.tensor([[1, 2]] * 2))])
    with pytest.raises(ValueError, match="teacher_temperature: expected None or a number > 0"):
        OfflineCollator(teacher_temperature=0)


# ------------------------------------------------------------------------------ converters


class Logprob:
    """vLLM's Logprob (vllm.sequence.Logprob): logprob, rank (1-based), decoded_token."""

    def __init__(self, logprob, rank, decoded_token):
        self.logprob, self.rank, self.decoded_token = logprob, rank, decoded_token


class RequestOutput:
    def __init__(self, prompt_token_ids, prompt_logprobs):
        self.prompt_token_ids, self.prompt_logprobs = prompt_token_ids, prompt_logprobs


def _engine_like(seed, n_tokens, n_top):
    """Prompt ids and, per position t >= 1, the top n_top (id, log-prob) of a random
    distribution plus the prompt token when it is outside them (as vLLM reports it); every
    third prompt token is its position's most likely one."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n_tokens,), generator=g).tolist()
    dists = torch.log_softmax(3 * torch.randn(n_tokens, V, generator=g, dtype=torch.float64), -1)
    for t in range(0, n_tokens, 3):
        ids[t] = int(dists[t].argmax())
    per_pos = [None]
    for t in range(1, n_tokens):
        top = dists[t].topk(n_top)
        entries = list(zip(top.indices.tolist(), top.values.tolist()))
        if ids[t] not in top.indices.tolist():
            entries.append((ids[t], dists[t, ids[t]].item()))
        per_pos.append(entries)
    return ids, per_pos, dists


def _check_converted(store, requests, n_top):
    assert store.manifest["k"] == n_top and store.manifest["vocab_size"] == V
    for item, (ids, _, dists) in zip(store, requests):
        assert item["input_ids"].tolist() == ids
        ref = dists[1:].topk(n_top, dim=-1)            # position t holds token t+1's prediction
        assert torch.equal(item["teacher_ids"][:-1], ref.indices)
        err = (item["teacher_logprobs"][:-1].double() - ref.values).abs()
        assert (err <= fmt.error_bound(ref.values) + 1e-6).all()
        assert torch.isneginf(item["teacher_logprobs"][-1]).all() and (item["teacher_ids"][-1] == 0).all()


def test_from_vllm_prompt_logprobs(tmp_path):
    requests = [_engine_like(s, n, 5) for s, n in ((0, 9), (1, 4))]
    outputs = []
    for ids, per_pos, _ in requests:
        plp = [None] + [{tok: Logprob(lp, r + 1, f"t{tok}") for r, (tok, lp) in enumerate(e)}
                        for e in per_pos[1:]]
        outputs.append(RequestOutput(ids, plp))
    from_vllm_prompt_logprobs(outputs, tmp_path, vocab_size=V)
    store = open_store(tmp_path)
    assert store.manifest["source"] == "from_vllm_prompt_logprobs"
    _check_converted(store, requests, 5)
    raw = RequestOutput([1, 2], [None, {1: Logprob(3.5, 1, "a"), 2: Logprob(1.0, 2, "b")}])
    with pytest.raises(ValueError, match="request 0: teacher_logprobs: expected log-probabilities"):
        from_vllm_prompt_logprobs([raw], tmp_path / "raw", vocab_size=V)
    with pytest.raises(ValueError, match=r"expected one entry per prompt token \(3\), got 2"):
        from_vllm_prompt_logprobs([RequestOutput([1, 2, 3], raw.prompt_logprobs)],
                                  tmp_path / "short", vocab_size=V, k=2)
    with pytest.raises(ValueError, match="teacher_ids: expected ids in"):
        from_vllm_prompt_logprobs([RequestOutput([1, 2], [None, {V + 3: Logprob(-0.1, 1, "")}])],
                                  tmp_path / "oov", vocab_size=V)


def test_from_sglang(tmp_path):
    requests = [_engine_like(s, n, 3) for s, n in ((2, 7), (3, 2))]
    outputs = []
    for ids, per_pos, dists in requests:
        outputs.append({"text": "", "meta_info": {
            "input_token_logprobs": [(None, ids[0], None)] + [
                (dists[t, ids[t]].item(), ids[t], None) for t in range(1, len(ids))],
            # SGLang reports the top N only (the prompt token's own log-prob is in
            # input_token_logprobs)
            "input_top_logprobs": [None] + [[(lp, tok, f"t{tok}") for tok, lp in e[:3]]
                                            for e in per_pos[1:]]}})
    from_sglang(outputs, tmp_path, vocab_size=V)
    _check_converted(open_store(tmp_path), requests, 3)
    from_sglang(outputs, tmp_path / "ids", vocab_size=V, k=2,
                input_ids=[ids for ids, _, _ in requests])
    assert open_store(tmp_path / "ids").manifest["k"] == 2
    with pytest.raises(ValueError, match="input_top_logprobs"):
        from_sglang([{"meta_info": {}}], tmp_path / "bad", vocab_size=V)


def test_writer_refuses_unsorted_and_bad_shapes(tmp_path):
    w = StoreWriter(tmp_path, vocab_size=V, k=2)
    with pytest.raises(ValueError, match="sorted by decreasing"):
        w.add([1, 2], [[1, 2], [3, 4]], torch.log(torch.tensor([[0.2, 0.5], [0.5, 0.2]])))
    with pytest.raises(ValueError, match=r"teacher_ids: expected shape \(2, 2\)"):
        w.add([1, 2], [[1, 2, 3], [3, 4, 5]], torch.zeros(2, 3))
    with pytest.raises(ValueError, match="teacher_logprobs: expected an"):
        w.add([1, 2], [[1, 2], [3, 4]])


# ---------------------------------------------------------------------------- the CLI


def test_pydistill_capture_cli(tmp_path, teacher, sequences, capsys):
    from pydistill.offline.capture import main
    teacher.save_pretrained(tmp_path / "model")
    with open(tmp_path / "data.jsonl", "w") as f:
        for s in sequences[:5]:
            f.write(json.dumps({"input_ids": s.tolist()}) + "\n")
    assert main([str(tmp_path / "model"), str(tmp_path / "data.jsonl"), "--out",
                 str(tmp_path / "store"), "--k", "3", "--temperature", "1.5", "--device", "cpu",
                 "--dtype", "float32", "--max-length", "6", "--no-progress"]) == 0
    assert "5 sequences" in capsys.readouterr().out
    store = open_store(tmp_path / "store")
    assert store.manifest["teacher"] == str(tmp_path / "model")
    item = store[2]
    assert torch.equal(item["input_ids"], sequences[2][:6])
    ref = _teacher_logprobs(teacher, sequences[2][:6], 1.5).topk(3, dim=-1)
    assert torch.equal(item["teacher_ids"], ref.indices)


# ------------------------------------------------------------------------------ the size


def test_bytes_per_entry_at_k64_v151936(tmp_path):
    """The issue's target: <= 3 bytes per stored (id, log-prob) entry on disk at K = 64,
    V = 151,936 (ids in 18 bits, log-probs within 1/128 nat)."""
    vocab, k, L = 151936, 64, 128
    lp, ids = zipf_teacher_topk(4 * L, vocab, k)
    g = torch.Generator().manual_seed(1)
    with StoreWriter(tmp_path, vocab_size=vocab, k=k) as w:
        for s in range(4):
            w.add(torch.randint(0, vocab, (L,), generator=g), ids[s * L:(s + 1) * L],
                  lp[s * L:(s + 1) * L])
    size = sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path) if f.endswith(".parquet"))
    per_entry = size / (4 * L * k)
    assert per_entry <= 3.0, per_entry
    store = open_store(tmp_path)
    back = torch.cat([it["teacher_logprobs"] for it in store])
    assert torch.equal(torch.cat([it["teacher_ids"] for it in store]), ids)
    assert ((back - lp).abs() <= fmt.error_bound(lp) + 1e-5).all()
    p4 = lp >= math.log(1e-4)
    assert ((back - lp)[p4].abs() <= QUANT_ERROR + 1e-5).all()

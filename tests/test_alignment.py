"""pydistill.alignment: teacher positions onto student positions by character offsets, on two
BPE tokenizers trained here (``tokenizers``, no download) on generated text.

The student's tokenizer is SentencePiece-like (BPE over Metaspace pre-tokens, a small
vocabulary: words split into several pieces), the teacher's GPT-2-like (byte-level BPE, a
larger vocabulary: whole words, and characters outside ASCII split into byte tokens that share
their character's offsets). What is checked is what the alignment promises: an aligned pair's
two prefixes decode to the same text, every boundary the two tokenizations share is aligned
(by the last token ending there), nothing else is, and the spans are those of TRL's GOLD.
"""
import os

import pytest
import torch

import pydistill as pdl
from pydistill import alignment as A

from conftest import CUDA, peer

tokenizers = peer("tokenizers")
# a byte-level (GPT-2 style) or a Metaspace (SentencePiece style) BPE trained on given texts
from pydistill.examples.cross_tokenizer import train_tokenizer as train_bpe  # noqa: E402

# a few words outside ASCII: 2- and 3-byte UTF-8 characters
_SPECIAL = ["café", "naïve", "€5", "über", "日本"]


def generated_texts(n: int, seed: int):
    """Sentences of a small Zipf-distributed lexicon of random letter strings."""
    g = torch.Generator().manual_seed(seed)
    letters = "abcdefghiklmnoprstu"
    lexicon = []
    while len(lexicon) < 60:
        size = int(torch.randint(1, 8, (), generator=g))
        word = "".join(letters[int(i)] for i in torch.randint(0, len(letters), (size,), generator=g))
        if word not in lexicon:
            lexicon.append(word)
    lexicon += _SPECIAL
    weights = 1.0 / torch.arange(1, len(lexicon) + 1, dtype=torch.float64)
    texts = []
    for _ in range(n):
        length = int(torch.randint(3, 15, (), generator=g))
        words = torch.multinomial(weights, length, replacement=True, generator=g)
        sentence = " ".join(lexicon[int(w)] for w in words)
        if int(torch.randint(0, 3, (), generator=g)) == 0:
            sentence += "."
        texts.append(sentence)
    return texts


@pytest.fixture(scope="module")
def toks():
    corpus = generated_texts(400, seed=0)
    student = train_bpe(corpus, 90, byte_level=False)
    teacher = train_bpe(corpus, 400, byte_level=True)
    # the premise of the tests: the two really tokenize differently
    text = corpus[0]
    assert student.encode(text).tokens != teacher.encode(text).tokens
    return student, teacher


@pytest.fixture(scope="module")
def texts():
    return generated_texts(40, seed=1) + [" ".join(_SPECIAL), "日本 über café."]


def prefix_ends(tok, text):
    """Where the text can be cut so that a prefix of the tokens decodes to exactly the text
    before the cut: the boundaries of this tokenization, found without offsets."""
    ids = tok.encode(text).ids
    out = set()
    for k in range(len(ids)):
        prefix = tok.decode(ids[:k + 1])
        if prefix and text.startswith(prefix):
            out.add(len(prefix))
    return out


def test_pairs_are_exactly_the_shared_boundaries(toks, texts):
    student, teacher = toks
    multi_token_words = 0
    for text in texts:
        s, t = student.encode(text), teacher.encode(text)
        s_pos, t_pos = A.alignment_pairs(s.offsets, t.offsets)
        assert s_pos.dtype == t_pos.dtype == torch.int64 and len(s_pos) == len(t_pos) > 0
        assert bool((s_pos.diff() > 0).all()) and bool((t_pos.diff() > 0).all())
        ends = [s.offsets[i][1] for i in s_pos.tolist()]
        assert ends == [t.offsets[j][1] for j in t_pos.tolist()]
        # every boundary both tokenizations have, and nothing else
        assert set(ends) == prefix_ends(student, text) & prefix_ends(teacher, text)
        assert ends[-1] == len(text)
        for i, j, c in zip(s_pos.tolist(), t_pos.tolist(), ends):
            # the two prefixes are the same text: both logits are conditioned on text[:c]
            assert teacher.decode(t.ids[:j + 1]) == text[:c]
            assert student.decode(s.ids[:i + 1]) == text[:c]
        multi_token_words += len(s.ids) - len(s_pos)
        # align_offsets is the same as a per-position index, -1 elsewhere
        index = A.align_offsets(s.offsets, t.offsets)
        assert index.shape == (len(s.ids),)
        assert index[s_pos].tolist() == t_pos.tolist()
        assert int((index >= 0).sum()) == len(s_pos)
    assert multi_token_words > 20  # the student's small vocabulary splits words


def test_characters_split_into_byte_tokens(toks):
    """A character the byte-level teacher splits into several tokens (all carrying that
    character's offsets) is aligned by its last byte token only."""
    student, teacher = toks
    text = "日本 über"
    s, t = student.encode(text), teacher.encode(text)
    shared = [j for j in range(len(t.offsets) - 1) if t.offsets[j] == t.offsets[j + 1]]
    assert shared, f"expected byte tokens sharing a character's offsets, got {t.offsets}"
    index = A.align_offsets(s.offsets, t.offsets)
    aligned_teacher = set(index[index >= 0].tolist())
    assert not aligned_teacher & set(shared)


def test_groups_are_golds(toks, texts):
    """alignment_groups gives TRL GOLD's spans (``ULDLoss._align_by_byte_offsets``) on GOLD's
    own byte offsets of two byte-level tokenizers, and the aligned pairs are the last tokens
    of those spans."""
    peer("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gold.gold_trainer import ULDLoss
    from trl.experimental.utils import encode_with_byte_offsets

    corpus = generated_texts(400, seed=0)
    small = train_bpe(corpus, 300, byte_level=True)
    _, teacher = toks
    for text in texts:
        (_, s_off), = encode_with_byte_offsets(small, [text])
        (_, t_off), = encode_with_byte_offsets(teacher, [text])
        groups = A.alignment_groups(s_off, t_off)
        assert groups == ULDLoss._align_by_byte_offsets(s_off, t_off)
        s_groups, t_groups = groups
        assert sum(s_groups, []) == list(range(len(s_off)))
        assert sum(t_groups, []) == list(range(len(t_off)))
        s_pos, t_pos = A.alignment_pairs(s_off, t_off)
        assert s_pos.tolist() == [g[-1] for g in s_groups]
        assert t_pos.tolist() == [g[-1] for g in t_groups]
        # each pair of groups covers the same bytes
        for gs, gt in zip(s_groups, t_groups):
            assert (s_off[gs[0]][0], s_off[gs[-1]][1]) == (t_off[gt[0]][0], t_off[gt[-1]][1])


def test_batch_from_hugging_face_tokenizers(toks, texts):
    """The documented batch path: fast tokenizers' padded (B, L, 2) offset mappings and
    attention masks, padding on either side."""
    peer("transformers")
    from transformers import PreTrainedTokenizerFast

    student, teacher = (PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
                        for tok in toks)
    batch = texts[:6]
    for side in ("right", "left"):
        student.padding_side = teacher.padding_side = side
        s = student(batch, padding=True, return_offsets_mapping=True, return_tensors="pt")
        t = teacher(batch, padding=True, return_offsets_mapping=True, return_tensors="pt")
        index = A.align_batch(s["offset_mapping"], t["offset_mapping"], s["attention_mask"],
                              t["attention_mask"])
        assert index.shape == s["input_ids"].shape and index.dtype == torch.int64
        assert bool((index[s["attention_mask"] == 0] == -1).all())
        for b, text in enumerate(batch):
            keep_s = s["attention_mask"][b].bool()
            keep_t = t["attention_mask"][b].bool()
            want = A.align_offsets(toks[0].encode(text).offsets, toks[1].encode(text).offsets)
            # the same alignment as the unpadded sequences, shifted by the padding
            shift_t = int((~keep_t).nonzero()[-1]) + 1 if side == "left" and not keep_t.all() else 0
            got = index[b][keep_s]
            assert got.tolist() == [v + shift_t if v >= 0 else -1 for v in want.tolist()]
            assert bool(keep_t[index[b][index[b] >= 0]].all())

    # ragged lists give the same as padded tensors (right padding), padded to student_length
    lists_s = [toks[0].encode(x).offsets for x in batch]
    lists_t = [toks[1].encode(x).offsets for x in batch]
    length = max(len(o) for o in lists_s) + 3
    ragged = A.align_batch(lists_s, lists_t, student_length=length)
    assert ragged.shape == (len(batch), length)
    for b in range(len(batch)):
        n = len(lists_s[b])
        assert ragged[b, :n].tolist() == A.align_offsets(lists_s[b], lists_t[b]).tolist()
        assert bool((ragged[b, n:] == -1).all())


def test_gather_rows_then_uld_loss(toks, texts):
    """The documented recipe: the teacher rows gathered onto the student positions, the
    unaligned ones ignored, equals uld_loss over the explicit pairs."""
    student, teacher = toks
    batch = texts[:3]
    s_off = [student.encode(x).offsets for x in batch]
    t_off = [teacher.encode(x).offsets for x in batch]
    index = A.align_batch(s_off, t_off)
    g = torch.Generator().manual_seed(5)
    length_t = max(len(o) for o in t_off)
    s_logits = torch.randn(len(batch), index.shape[1], 37, generator=g, dtype=torch.float64) * 3
    t_logits = (torch.randn(len(batch), length_t, 53, generator=g, dtype=torch.float64) * 3
                ).requires_grad_()
    rows = A.gather_rows(t_logits, index)
    assert rows.shape == (len(batch), index.shape[1], 53)
    labels = torch.where(index >= 0, 0, -100)
    got = pdl.uld_loss(s_logits, rows, labels=labels, top_k=5, reduction="sum", backend="torch")
    want = 0.0
    for b in range(len(batch)):
        s_pos, t_pos = A.alignment_pairs(s_off[b], t_off[b])
        want = want + pdl.uld_loss(s_logits[b, s_pos], t_logits[b, t_pos], top_k=5,
                                   reduction="sum", backend="torch")
    torch.testing.assert_close(got, want)
    # differentiable w.r.t. the teacher rows (a teacher being trained, or a check)
    g_got, = torch.autograd.grad(got, t_logits)
    g_want, = torch.autograd.grad(want, t_logits)
    torch.testing.assert_close(g_got, g_want)


def test_overlapping_offsets_are_not_boundaries(toks):
    """A Metaspace tokenizer prepends a space to the text and gives that token the first
    character's offsets, so the first word's token starts at 0 again: the space alone is not
    the prefix its offsets say."""
    student, _ = toks
    s = student.encode("lunnkc gam")
    assert s.tokens[0] == "\u2581" and s.offsets[0] == (0, 1) and s.offsets[1][0] == 0, s.tokens
    assert student.decode(s.ids[:1]) == ""
    teacher = [(0, 1), (1, 6), (6, 10)]  # "l", "unnkc", " gam"
    index = A.align_offsets(s.offsets, teacher)
    assert index[0] == -1
    assert index.tolist().count(0) == 0  # "l" has no partner: no student prefix is "l"


def test_zero_width_tokens_and_masks_are_never_aligned():
    # BOS (0, 0), then "ab" + "c" against "abc", then an EOS (3, 3)
    s = [(0, 0), (0, 2), (2, 3), (3, 3)]
    t = [(0, 0), (0, 3), (3, 3)]
    assert A.align_offsets(s, t).tolist() == [-1, -1, 1, -1]
    # a masked token is not a candidate: here the student's last piece
    assert A.align_offsets(s, t, student_mask=[1, 1, 0, 1]).tolist() == [-1, -1, -1, -1]
    # as tensors
    got = A.align_offsets(torch.tensor(s), torch.tensor(t, dtype=torch.int32))
    assert got.tolist() == [-1, -1, 1, -1]


@pytest.mark.parametrize("call, exc, words", [
    (lambda: A.align_offsets(torch.zeros(3, 3, dtype=torch.long), [(0, 1)]), ValueError,
     ["student_offsets", "(L, 2)", "(3, 3)"]),
    (lambda: A.align_offsets([(0, 1)], torch.zeros(2, 2)), TypeError,
     ["teacher_offsets", "integer", "torch.float32"]),
    (lambda: A.align_offsets([(0, 1, 2)], [(0, 1)]), ValueError, ["student_offsets", "(0, 1, 2)"]),
    (lambda: A.align_offsets(5, [(0, 1)]), TypeError, ["student_offsets", "int"]),
    (lambda: A.align_offsets([(0, 1)], [(0, 1)], student_mask=[1, 1]), ValueError,
     ["student_mask", "1", "2"]),
    (lambda: A.align_batch([[(0, 1)]], [[(0, 1)], [(0, 1)]]), ValueError,
     ["teacher_offsets", "1", "2"]),
    (lambda: A.align_batch([[(0, 1), (1, 2)]], [[(0, 2)]], student_length=1), ValueError,
     ["student_length", "2", "1"]),
    (lambda: A.gather_rows(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long)), ValueError,
     ["teacher", "(B, L_t, D)", "(2, 3)"]),
    (lambda: A.gather_rows(torch.zeros(2, 3, 4), torch.zeros(3, 3, dtype=torch.long)), ValueError,
     ["index", "(2, L_s)", "(3, 3)"]),
    (lambda: A.gather_rows(torch.zeros(2, 3, 4), torch.zeros(2, 3)), TypeError,
     ["index", "int64", "torch.float32"]),
    # past the teacher's end (was torch.gather's error) and below -1 (was silently row 0)
    (lambda: A.gather_rows(torch.zeros(2, 3, 4), torch.tensor([[0, 3], [1, -1]])), ValueError,
     ["index", "[-1, 3)", "got 3 at [0, 1]"]),
    (lambda: A.gather_rows(torch.zeros(2, 3, 4), torch.tensor([[0, 1], [-2, 2]], dtype=torch.int32)),
     ValueError, ["index", "[-1, 3)", "got -2 at [1, 0]"]),
    (lambda: A.gather_rows(torch.zeros(1, 0, 4), torch.tensor([[-1]])), ValueError,
     ["teacher", "at least one position", "(1, 0, 4)"]),
    # unsorted offsets (made an empty group)
    (lambda: A.alignment_groups([(0, 3), (3, 5)], [(3, 5), (0, 3)]), ValueError,
     ["teacher_offsets", "non-decreasing", "end 3 at position 1 after end 5 at position 0"]),
    (lambda: A.alignment_groups([(2, 4), (0, 0), (0, 2)], [(0, 4)]), ValueError,
     ["student_offsets", "end 2 at position 2 after end 4 at position 0"]),
])
def test_bad_input(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_groups_keep_zero_width_tokens_anywhere():
    """Zero-width tokens (BOS, EOS, padding) do not count as out of order."""
    s_groups, t_groups = A.alignment_groups([(0, 0), (0, 2), (2, 3), (0, 0)], [(0, 3), (3, 3)])
    assert s_groups == [[0, 1, 2], [3]] and t_groups == [[0], [1]]


@pytest.mark.skipif(not CUDA, reason="an index on the GPU")
def test_gather_rows_index_on_the_gpu_is_not_synchronised():
    """An index already on the GPU is not read back: out-of-range entries give NaN rows (no
    device-side assert, no borrowed row), in range the rows of the CPU index."""
    teacher = torch.randn(2, 3, 4, device="cuda")
    index = torch.tensor([[0, 3], [-2, -1]])
    rows = A.gather_rows(teacher, index.cuda())
    assert rows[0, 1].isnan().all() and rows[1, 0].isnan().all()
    torch.testing.assert_close(rows[0, 0], teacher[0, 0])
    torch.testing.assert_close(rows[1, 1], teacher[1, 0])

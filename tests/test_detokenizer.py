"""Incremental detokenisation with real (tiny, trained-here) tokenizers, stop-string helpers,
StopChecker, and SamplingParams validation messages."""
from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sglang_duet.detokenizer import IncrementalDetokenizer, StopChecker, find_stop_string, holdback_len
from sglang_duet.sampling_params import SamplingParams, SamplingParamsError

CORPUS = [
    "Le café est très bon, déjà vu à l'été.",
    "中文 文本 测试 中文字符 中国 文化",
    "Emoji time 🙂🙂 party 🎉 and 👍🏽 done",
    "The quick brown fox jumps over the lazy dog. STOP here.",
    "naïve façade coöperate résumé ñandú",
] * 20

TEXTS = [
    "Le café 中文 🙂 déjà",
    "中文字符 and 🎉🎉 emoji 👍🏽!",
    "plain ascii only, nothing fancy",
    "résumé 中国文化 STOP 🙂 end",
    "ünseen çhars ∑ ∫ ♞ still work",  # characters absent from training: pure byte tokens
]


@pytest.fixture(scope="module")
def byte_tok() -> PreTrainedTokenizerFast:
    """Byte-level BPE: multi-byte characters are split over several tokens, and merges can
    straddle character boundaries."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                   clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def meta_tok() -> PreTrainedTokenizerFast:
    """SentencePiece-style Metaspace: decode() drops the leading space of the first piece, so the
    decode of a suffix is NOT the suffix of the decode."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


def stream(tok, ids, chunk=lambda: 1, prompt_ids=None):
    det = IncrementalDetokenizer(tok, prompt_ids=prompt_ids)
    deltas, i = [], 0
    while i < len(ids):
        n = chunk()
        deltas.append(det.add(ids[i:i + n]))
        i += n
    deltas.append(det.flush())
    return det, deltas


# ---- IncrementalDetokenizer ---------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_one_by_one_matches_full_decode(byte_tok, text):
    ids = byte_tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # really split into several tokens
    det, deltas = stream(byte_tok, ids)
    assert det.text == "".join(deltas) == byte_tok.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in d for d in deltas)


def test_byte_level_splits_characters_over_tokens(byte_tok):
    # Guard that the tokenizer exercises the hold-back path at all.
    ids = byte_tok.encode("∑ ♞ 👍🏽", add_special_tokens=False)
    assert any("\ufffd" in byte_tok.decode([t]) for t in ids)
    det = IncrementalDetokenizer(byte_tok)
    assert "" in [det.add([t]) for t in ids]  # something was held back


def test_random_chunks_and_special_tokens(byte_tok):
    eos, pad = byte_tok.convert_tokens_to_ids(["<eos>", "<pad>"])
    rng = random.Random(0)
    for text in TEXTS:
        ids = byte_tok.encode(text, add_special_tokens=False)
        ids = ids[:3] + [pad] + ids[3:] + [eos]
        det, deltas = stream(byte_tok, ids, chunk=lambda: rng.randint(1, 4))
        assert det.text == byte_tok.decode(ids, skip_special_tokens=True) == text
        assert not any("\ufffd" in d for d in deltas)
    # Without skipping, special tokens appear in the text.
    det = IncrementalDetokenizer(byte_tok, skip_special_tokens=False)
    for t in byte_tok.encode("hi", add_special_tokens=False) + [eos]:
        det.add([t])
    assert det.text == "hi<eos>"


def test_metaspace_suffix_decode_differs(meta_tok):
    text = "The quick brown fox jumps over the lazy dog."
    ids = meta_tok.encode(text, add_special_tokens=False)
    # Naive per-token decode loses the spaces; the offsets technique must not.
    assert "".join(meta_tok.decode([t]) for t in ids) != text
    det, _ = stream(meta_tok, ids)
    assert det.text == meta_tok.decode(ids) == text


def test_prompt_context_keeps_leading_space(meta_tok):
    prompt = meta_tok.encode("The quick", add_special_tokens=False)
    out = meta_tok.encode("The quick brown fox", add_special_tokens=False)[len(prompt):]
    det, _ = stream(meta_tok, out, prompt_ids=prompt)
    assert det.text == " brown fox"  # decoded as a continuation of the prompt


def test_flush_emits_trailing_incomplete_character(byte_tok):
    ids = byte_tok.encode("ok ∑♞", add_special_tokens=False)  # unseen chars: byte tokens
    det = IncrementalDetokenizer(byte_tok)
    cut = next(k for k in range(len(ids), 0, -1) if byte_tok.decode(ids[:k]).endswith("\ufffd"))
    for t in ids[:cut]:
        det.add([t])
    assert not det.text.endswith("\ufffd")
    det.flush()
    assert det.text == byte_tok.decode(ids[:cut])


# ---- stop strings -------------------------------------------------------------------------------


def test_find_stop_string_split_across_deltas():
    assert find_stop_string("abc STOP def", ["STOP"], start=7) == (4, "STOP")
    assert find_stop_string("abc ST", ["STOP"], start=4) is None
    assert find_stop_string("STOP then more", ["STOP"], start=9) is None  # already reported before
    assert find_stop_string("xx ab abc", ["abc", "ab"], start=0) == (3, "ab")  # earliest
    assert find_stop_string("xx abc", ["abc", "ab"], start=0) == (3, "ab")  # tie: shorter
    assert find_stop_string("nothing", [], start=0) is None


def test_holdback_len():
    assert holdback_len("hello wor", ["world"]) == 3
    assert holdback_len("hello", ["xyz"]) == 0
    assert holdback_len("xab", ["abc", "b"]) == 2
    assert holdback_len("a", ["aaa"]) == 1
    assert holdback_len("complete world", ["world"]) == 0  # a whole stop is not a prefix


def test_streaming_with_holdback_never_leaks_stop(byte_tok):
    text = "résumé 中国文化 STOP 🙂 end"
    stops = ["中国文", "ST"]
    ids = byte_tok.encode(text, add_special_tokens=False)
    det, sent = IncrementalDetokenizer(byte_tok), 0
    streamed = ""
    for t in ids:
        start = len(det.text)
        det.add([t])
        hit = find_stop_string(det.text, stops, start)
        if hit:
            streamed += det.text[sent:hit[0]]
            break
        safe = len(det.text) - holdback_len(det.text, stops)
        streamed += det.text[sent:safe]
        sent = max(sent, safe)
    assert hit == (len("résumé "), "中国文")
    assert streamed == "résumé "


def test_stop_checker_fires_exactly_on_completing_token(byte_tok):
    checker = StopChecker(byte_tok)
    for text, stops in [
        ("Le café 中文 🙂 déjà 中文 again", ["中文"]),
        ("Emoji 🙂🙂 party 🎉 done", ["🎉", "party"]),
        ("The quick brown fox. STOP here.", ["STOP", "fox."]),
        ("x ∑♞ y ♞∑ z ∑♞", ["∑♞"]),  # unseen chars: the stop completes on a byte token
    ]:
        ids = byte_tok.encode(text, add_special_tokens=False)
        for k in range(1, len(ids) + 1):
            full, prev = byte_tok.decode(ids[:k]), byte_tok.decode(ids[:k - 1])
            # Reference: a stop occurrence appeared with token k.
            expect = [s for s in stops if full.count(s) > prev.count(s)]
            got = checker.check(ids[:k], stops, skip_special_tokens=True)
            assert (got is not None) == bool(expect), (text, k)
            if got:
                assert got in expect


def test_stop_checker_looks_past_empty_tokens(byte_tok):
    pad = byte_tok.convert_tokens_to_ids("<pad>")
    ids = byte_tok.encode("a", add_special_tokens=False) + [pad] * 40 + byte_tok.encode("b", add_special_tokens=False)
    checker = StopChecker(byte_tok)
    assert checker.check(ids, ["ab"], skip_special_tokens=True) == "ab"
    assert checker.check(ids, ["ab"], skip_special_tokens=False) is None
    assert checker.check(ids[:-1], ["ab"], skip_special_tokens=True) is None
    assert checker.check(ids, [], skip_special_tokens=True) is None


# ---- SamplingParams validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    "d, msg",
    [
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5."),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0."),
        ({"temperature": -0.5}, "temperature must be non-negative, got -0.5."),
        ({"temperature": float("nan")}, "temperature must be a finite number, got nan."),
        ({"top_k": 0}, "top_k must be -1 (disable), or at least 1, got 0."),
        ({"min_p": 2}, "min_p must be in [0, 1], got 2."),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be in (0, 2], got 0.0."),
        ({"frequency_penalty": 3}, "frequency_penalty must be in [-2, 2], got 3."),
        ({"min_new_tokens": 5, "max_new_tokens": 2}, "min_new_tokens must be in [0, max_new_tokens(2)], got 5."),
        ({"top_logprobs": 21}, "top_logprobs must be an integer in [0, 20], got 21."),
        ({"stop": [""]}, "stop strings must not be empty."),
        ({"bogus": 1}, "Unknown sampling parameter(s): bogus."),
        ({"temperature": "hot"}, "temperature must be a number, got 'hot'."),
    ],
)
def test_sampling_params_messages(d, msg):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams.from_dict(d)
    assert str(e.value) == msg


def test_sampling_params_normalise():
    p = SamplingParams.from_dict({"stop": "###", "sampling_seed": 7, "temperature": 0})
    assert p.stop == ["###"] and p.seed == 7 and p.is_greedy


# ---- ByteLevelTable / ByteLevelDetokenizer -------------------------------------------------------


def test_byte_level_table_only_for_byte_level_tokenizers(byte_tok, meta_tok):
    from sglang_duet.detokenizer import ByteLevelTable

    assert ByteLevelTable.build(byte_tok) is not None
    assert ByteLevelTable.build(meta_tok) is None  # Metaspace: a suffix's decode is not the decode's suffix


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_detokenizer_streams_the_full_decode(byte_tok, text):
    """Token by token and in odd chunks, specials in between: the deltas add up to decode(ids), and no
    delta ever holds a half character (U+FFFD) the full decode does not."""
    from sglang_duet.detokenizer import ByteLevelDetokenizer, ByteLevelTable

    table = ByteLevelTable.build(byte_tok)
    eos = byte_tok.convert_tokens_to_ids("<eos>")
    ids = byte_tok.encode(text, add_special_tokens=False)
    ids = ids[:3] + [eos] + ids[3:]
    rng = random.Random(len(text))
    for skip in (True, False):
        det = ByteLevelDetokenizer(table, skip)
        deltas, i = [], 0
        while i < len(ids):
            n = rng.randint(1, 3)
            deltas.append(det.add(ids[i:i + n]))
            i += n
        deltas.append(det.flush())
        full = byte_tok.decode(ids, skip_special_tokens=skip)
        assert "".join(deltas) == det.text == full
        if "\ufffd" not in full:  # (an eos kept in the middle of a character breaks it in the decode too)
            assert not any("\ufffd" in d for d in deltas)


def test_byte_level_detokenizer_flushes_an_incomplete_character_as_the_decode_does(byte_tok):
    from sglang_duet.detokenizer import ByteLevelDetokenizer, ByteLevelTable

    table = ByteLevelTable.build(byte_tok)
    ids = byte_tok.encode("∑", add_special_tokens=False)  # unseen in training: one token per byte
    assert len(ids) > 1  # a 3-byte char over several tokens
    det = ByteLevelDetokenizer(table)
    assert det.add(ids[:-1]) == ""  # held back: incomplete
    assert det.flush() == byte_tok.decode(ids[:-1])  # the request ended there: shown as the decode shows it

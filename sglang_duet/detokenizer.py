"""Incremental detokenisation and stop-string helpers (pure Python, no torch).

Why the offsets: decoding token by token and concatenating is wrong for two reasons.
  * Byte-level BPE splits one multi-byte UTF-8 character over several tokens; a lone piece
    decodes to U+FFFD, which must not be streamed.
  * decode(suffix) != suffix of decode(all) for many tokenizers (SentencePiece drops the leading
    space of the first piece, cleanup rules look at neighbours, ...).
So each step decodes a short window [prefix_offset, len(ids)) and subtracts the decode of
[prefix_offset, read_offset) — text already emitted, decoded in the same left context. The window
only advances once its decode ends in a complete character.

Batching: `IncrementalDetokenizer.windows()` / `commit()` split a step into "which ids to decode"
and "what follows from their text", so a server can decode the windows of every request of a step
in one call (`BatchDecoder`: the Rust tokenizer's decode_batch, ~10x less time per window than
HF's decode); `add()` / `flush()` are the same two phases with one decode each.
"""
from __future__ import annotations

from codecs import utf_8_decode as _utf8_decode
from typing import Any

_REPLACEMENT = "\ufffd"
# Tokens of prompt context decoded in front of the output, so its first piece is rendered as it
# would be mid-text (e.g. keeps SentencePiece's leading space). Same as SGLang/vLLM.
_PROMPT_CONTEXT_TOKENS = 5


def _decode(tokenizer: Any, ids: list[int], skip_special_tokens: bool, spaces_between_special_tokens: bool) -> str:
    if not ids:
        return ""
    return tokenizer.decode(
        ids,
        skip_special_tokens=skip_special_tokens,
        spaces_between_special_tokens=spaces_between_special_tokens,
    )


class IncrementalDetokenizer:
    """Turns a stream of output token ids into a stream of safe-to-emit text deltas."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        context = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:]) if prompt_ids else []
        self._ids: list[int] = context  # prompt context + output tokens
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = len(context)  # everything before this has been emitted
        self.text = ""  # all text emitted so far
        self.output_ids: list[int] = []

    def _window(self, start: int, end: int | None = None) -> str:
        return _decode(
            self.tokenizer, self._ids[start:end], self.skip_special_tokens, self.spaces_between_special_tokens
        )

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the new text that is safe to emit ('' while a character is incomplete)."""
        if not token_ids:
            return ""
        self.push(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Emit whatever is held back (call when the request finishes: a trailing U+FFFD is then real)."""
        return self._advance(final=True)

    def push(self, token_ids: list[int]) -> None:
        """Append tokens without decoding (then `windows()` + `commit()`)."""
        self._ids.extend(token_ids)
        self.output_ids.extend(token_ids)

    def windows(self) -> tuple[list[int], list[int]] | None:
        """The two id windows whose decodes `commit` needs (already emitted, and everything), or None
        when there is nothing new to decode."""
        if self._read_offset >= len(self._ids):
            return None
        return self._ids[self._prefix_offset:self._read_offset], self._ids[self._prefix_offset:]

    def _advance(self, final: bool) -> str:
        w = self.windows()
        if w is None:
            return ""
        skip, spaces = self.skip_special_tokens, self.spaces_between_special_tokens
        return self.commit(_decode(self.tokenizer, w[0], skip, spaces), _decode(self.tokenizer, w[1], skip, spaces),
                           final)

    def commit(self, prefix_text: str, new_text: str, final: bool) -> str:
        """Given the decodes of `windows()`, emit the new safe text and move the window. With
        final=True whatever is held back is emitted (add + flush in one step gives the same text)."""
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT)):
            # Nothing new yet (e.g. a skipped special token) or a character still incomplete.
            return ""
        if new_text.startswith(prefix_text):
            delta = new_text[len(prefix_text):]
        else:
            # The window's decode rewrote text we already emitted (rare: a tokenizer whose earlier
            # chars depend on later tokens). Emitted text cannot be taken back; emit what follows
            # the common prefix, skipping the part already sent.
            delta = new_text[max(len(prefix_text), _common_prefix_len(prefix_text, new_text)):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.text += delta
        return delta


class BatchDecoder:
    """Decodes many id lists at once, exactly as `tokenizer.decode(ids, skip_special_tokens=...,
    spaces_between_special_tokens=...)` would one by one.

    A transformers fast tokenizer whose decode is the stock one (the Rust tokenizer's decode, with
    no clean-up pass) goes through the Rust `decode_batch`; anything else falls back to one
    `decode` call per list.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.rust = _rust_backend(tokenizer)

    def decode(self, seqs: list[list[int]], skip_special_tokens: bool = True,
               spaces_between_special_tokens: bool = True) -> list[str]:
        if not seqs:
            return []
        if self.rust is not None:
            return self.rust.decode_batch(seqs, skip_special_tokens=skip_special_tokens)
        return [_decode(self.tokenizer, s, skip_special_tokens, spaces_between_special_tokens) for s in seqs]


class ByteLevelTable:
    """The bytes each token id stands for, for a byte-level BPE tokenizer (GPT-2, Llama 3, Qwen,
    SmolLM): there `decode(ids)` is exactly the lossy UTF-8 decode of the concatenated bytes of
    its tokens (special tokens dropped when skipped), so a stream can be detokenized by appending
    each new token's bytes to an incremental UTF-8 decoder: O(new tokens) per step, no decode
    windows, no tokenizer call. `build` returns None for any other tokenizer, and for one whose own
    decode disagrees with the table (checked once, on every id and on mixed sequences)."""

    def __init__(self, pieces: list[bytes], special: frozenset[int]):
        self.pieces = pieces
        self.special = special  # ids skipped by skip_special_tokens=True
        # each piece's text where it is complete UTF-8 on its own (None: part of a character)
        self.texts = [_complete_text(b) for b in pieces]

    @classmethod
    def build(cls, tokenizer: Any) -> "ByteLevelTable | None":
        rust = _rust_backend(tokenizer)
        if rust is None:
            return None
        try:
            if type(rust.decoder).__name__ != "ByteLevel":
                return None
            vocab = rust.get_vocab(with_added_tokens=True)
            special = frozenset(i for i, t in rust.get_added_tokens_decoder().items() if t.special)
        except Exception:  # noqa: BLE001 - an unusual tokenizer: the general path
            return None
        n = max(vocab.values(), default=-1) + 1
        if len(vocab) != n:
            return None  # holes in the id space
        tokens = [""] * n
        for t, i in vocab.items():
            tokens[i] = t
        table = cls(_token_bytes(tokens), special)
        return table if table._agrees(rust, n) else None

    def _agrees(self, rust, n: int) -> bool:
        """The tokenizer's own decode of every id (in runs of consecutive ids, specials kept) and of
        some mixed sequences (specials skipped and kept) equals the lossy decode of their bytes."""
        import random

        runs = [list(range(i, min(n, i + 512))) for i in range(0, n, 512)]
        rng = random.Random(0)
        mixed = [[rng.randrange(n) for _ in range(rng.randint(1, 12))] for _ in range(64)]
        mixed += [sorted(self.special)[:8] + s for s in mixed[:8]]
        for seqs, skip in ((runs, False), (mixed, False), (mixed, True)):
            for s, text in zip(seqs, rust.decode_batch(seqs, skip_special_tokens=skip)):
                if text != self.text(s, skip):
                    return False
        return True

    def ids_bytes(self, ids: list[int], skip_special_tokens: bool) -> bytes:
        pieces = self.pieces
        if skip_special_tokens and self.special:
            special = self.special
            return b"".join([pieces[i] for i in ids if i not in special])
        return b"".join([pieces[i] for i in ids])

    def text(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.ids_bytes(ids, skip_special_tokens).decode("utf-8", "replace")


class ByteLevelDetokenizer:
    """IncrementalDetokenizer's job for a byte-level tokenizer (see ByteLevelTable): the text is
    the lossy UTF-8 decode of the output's bytes, a character split over tokens is held back
    until complete, and `flush` releases an incomplete tail as U+FFFD (as the full decode would
    show it). The concatenation of the deltas is decode(output_ids).

    Runs once per request per step: the usual token (nothing held back, a piece that is complete
    UTF-8 on its own) takes its text from the table's `texts`, with no decoder call."""

    __slots__ = ("table", "skip_special_tokens", "_held", "text", "num_ids")

    def __init__(self, table: ByteLevelTable, skip_special_tokens: bool = True):
        self.table = table
        self.skip_special_tokens = skip_special_tokens
        self._held = b""  # the bytes of an incomplete character
        self.text = ""  # all text emitted so far
        self.num_ids = 0

    def add(self, token_ids: list[int], final: bool = False) -> str:
        """Append tokens; return the new text that is complete (with final=True: everything)."""
        self.num_ids += len(token_ids)
        t = self.table
        if len(token_ids) == 1 and not self._held and not final:
            tid = token_ids[0]
            delta = t.texts[tid]
            if delta is not None and not (self.skip_special_tokens and tid in t.special):
                if delta:
                    self.text += delta
                return delta
        b = t.ids_bytes(token_ids, self.skip_special_tokens) if token_ids else b""
        if self._held:
            b = self._held + b
        delta, used = _utf8_decode(b, "replace", final)
        self._held = b[used:]
        if delta:
            self.text += delta
        return delta

    def flush(self) -> str:
        return self.add([], final=True)


def _complete_text(piece: bytes) -> str | None:
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _token_bytes(tokens: list[str]) -> list[bytes]:
    """Each byte-level token's bytes, as the Rust ByteLevel decoder gives them: a char of GPT-2's
    byte alphabet is its byte, any other char its UTF-8 bytes. One str.translate per token into
    latin-1 chars (one per output byte), then encoded."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    k = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + k)
            k += 1
    trans: dict[int, object] = {c: b for b, c in zip(bs, cs)}
    for c in range(256):  # a low char outside the alphabet: its own UTF-8 bytes, as latin-1 chars
        if c not in trans:
            trans[c] = chr(c).encode().decode("latin-1")
    out = []
    for t in tokens:
        u = t.translate(trans)
        try:
            out.append(u.encode("latin-1"))
        except UnicodeEncodeError:  # a char beyond U+00FF outside the alphabet (added tokens)
            out.append(b"".join(ch.encode("latin-1") if ord(ch) < 256 else ch.encode() for ch in u))
    return out


def _rust_backend(tokenizer: Any):
    """The tokenizers.Tokenizer behind a transformers tokenizer when decoding through it directly
    gives what the tokenizer's own decode gives; else None. A DecodeTokenizer (the scheduler's,
    model_loader/decode_tokenizer.py) is its backend's decode by construction."""
    from sglang_duet.model_loader.decode_tokenizer import DecodeTokenizer

    if isinstance(tokenizer, DecodeTokenizer):
        return tokenizer.backend
    try:
        import tokenizers
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    except ImportError:
        return None
    rust = getattr(tokenizer, "_tokenizer", None)
    if not isinstance(rust, tokenizers.Tokenizer) or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None
    cls = type(tokenizer)
    stock = []
    for mod, name in (("transformers.tokenization_utils_tokenizers", "TokenizersBackend"),
                      ("transformers.tokenization_utils_fast", "PreTrainedTokenizerFast")):
        try:
            stock.append(getattr(__import__(mod, fromlist=[name]), name)._decode)
        except (ImportError, AttributeError):
            pass
    if cls.decode is not PreTrainedTokenizerBase.decode or cls._decode not in stock:
        return None  # a tokenizer class with its own decoding: ask it one list at a time
    return rust


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def find_stop_string(text: str, stops: list[str], start: int = 0) -> tuple[int, str] | None:
    """Earliest stop-string match in `text` that ends after `start`.

    `start` is where the newly added text begins (len(text) before the last delta): a stop string
    split across deltas is found because each stop is searched from `start - len(stop) + 1`, and a
    match lying wholly before `start` is not reported again. Returns (index where the match
    begins, the stop string). Ties (same index) go to the shorter stop, the one a finer-grained
    stream would have completed first.
    """
    best: tuple[int, str] | None = None
    for s in stops:
        if not s:
            continue
        i = text.find(s, max(0, start - len(s) + 1))
        if i < 0:
            continue
        if best is None or i < best[0] or (i == best[0] and len(s) < len(best[1])):
            best = (i, s)
    return best


def holdback_len(text: str, stops: list[str]) -> int:
    """How many trailing chars of `text` could begin a stop string (so must not be streamed yet)."""
    best = 0
    for s in stops:
        # Only proper prefixes: a complete stop is find_stop_string's business.
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class StopChecker:
    """Per-token stop-string check for the scheduler: decodes only a short tail of the output."""

    # Extra tokens beyond the longest stop's length: covers tokens that decode to nothing
    # (skipped specials, pieces of a multi-byte char) without decoding the whole output.
    MARGIN_TOKENS = 8

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def check(self, output_ids: list[int], stops: list[str], skip_special_tokens: bool = True) -> str | None:
        """The stop string that ends inside the text of output_ids[-1], or None."""
        if not stops or not output_ids:
            return None
        longest = max(len(s) for s in stops)
        n = longest + self.MARGIN_TOKENS
        while True:
            tail_ids = output_ids[-n:]
            tail = _decode(self.tokenizer, tail_ids, skip_special_tokens, True)
            # Enough context once the tail before the last token holds a whole stop string, or
            # there is nothing more to decode.
            before = _decode(self.tokenizer, tail_ids[:-1], skip_special_tokens, True)
            if len(before) >= longest or n >= len(output_ids):
                break
            n *= 2
        # The last token's text starts where `tail` stops agreeing with `before` (a completed
        # multi-byte char replaces a trailing U+FFFD of `before`).
        cut = _common_prefix_len(before, tail)
        hit = find_stop_string(tail, stops, cut)
        return hit[1] if hit else None

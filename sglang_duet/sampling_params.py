"""Sampling parameters of one request, with SGLang's names, defaults and error wording."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

_EPS = 1e-6
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 512


class SamplingParamsError(ValueError):
    """A sampling parameter out of range; the message names it (served as HTTP 400)."""


@dataclass
class SamplingParams:
    max_new_tokens: int | None = 128
    min_new_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    # Structured output (SGLang's names; at most one): the output must match this JSON schema (a
    # JSON string), regular expression, EBNF grammar (xgrammar's GBNF dialect), or structural tag
    # (a JSON string: free text with tagged JSON parts, xgrammar's structural tag). See constrained/.
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None

    @classmethod
    def from_dict(cls, d: dict | None, vocab_size: int | None = None) -> "SamplingParams":
        """Build, normalize and verify, once. With `vocab_size`, also the checks of verify(vocab_size)
        (stop token ids in the vocabulary), with the errors in the order of from_dict(d) then
        verify(vocab_size): what a caller verifying twice would report."""
        if type(d) is not dict:
            d = dict(d or {})  # None, a mapping or pairs, as dict() takes them (and refuses the rest)
        if "sampling_seed" in d and "seed" not in d:  # SGLang's name for the seed
            d = dict(d)
            d["seed"] = d.pop("sampling_seed")
        if not _FIELD_SET.issuperset(d):
            unknown = sorted(set(d) - _FIELD_SET)
            raise SamplingParamsError(f"Unknown sampling parameter(s): {', '.join(unknown)}.")
        p = cls(**d)  # the keyword arguments are a new dict: `d` is never changed
        p.normalize()
        if not p._plainly_valid(vocab_size):
            p._check(None)
            if vocab_size is not None:
                p._check(vocab_size)
        return p

    def to_dict(self) -> dict:
        # What asdict() gives (the fields are scalars and lists of scalars), without its recursive
        # deepcopy: ~20 us of the main process's CPU per request at admission.
        return {name: (v.copy() if type(v) is list else v) for name in _FIELD_NAMES
                for v in (getattr(self, name),)}

    def normalize(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if self.top_k == 0:
            # SGLang treats 0 like vLLM's "disabled" only through -1; keep 0 an error in verify.
            pass

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _EPS or self.top_k == 1

    def verify(self, vocab_size: int | None = None) -> None:
        """Raise SamplingParamsError naming the first parameter out of range (ids outside
        [0, vocab_size) too, when given)."""
        if not self._plainly_valid(vocab_size):
            self._check(vocab_size)

    def _plainly_valid(self, vocab_size: int | None) -> bool:
        """True only where `_check` passes: a usual request, checked with exact types (no bool, no
        subclass), ints well inside a float's range, no grammar, and no message to build (~1 us).
        Anything else, valid or not, goes through `_check`, which names the first problem."""
        n = _NUMBER
        mx, mn, top_k, stop, ids = self.max_new_tokens, self.min_new_tokens, self.top_k, self.stop, self.stop_token_ids
        return (
            type(self.temperature) in n and 0 <= self.temperature < _BIG
            and type(self.top_p) in n and 0 < self.top_p <= 1
            and type(self.min_p) in n and 0 <= self.min_p <= 1
            and type(self.frequency_penalty) in n and -2 <= self.frequency_penalty <= 2
            and type(self.presence_penalty) in n and -2 <= self.presence_penalty <= 2
            and type(self.repetition_penalty) in n and 0 < self.repetition_penalty <= 2
            and type(top_k) is int and (top_k == -1 or 1 <= top_k < _BIG)
            and type(mn) is int and 0 <= mn < _BIG
            and (mx is None or (type(mx) is int and mn <= mx < _BIG))
            and type(stop) is list
            and (not stop or (len(stop) <= MAX_STOP_STRINGS
                              and all(type(x) is str and 0 < len(x) <= MAX_STOP_STRING_LEN for x in stop)))
            and type(ids) is list
            and (not ids or all(type(t) is int and (vocab_size is None or 0 <= t < vocab_size) for t in ids))
            and type(self.ignore_eos) is bool and type(self.skip_special_tokens) is bool
            and type(self.spaces_between_special_tokens) is bool and type(self.no_stop_trim) is bool
            and type(self.logprobs) is bool
            and (self.seed is None or type(self.seed) is int)
            and type(self.top_logprobs) is int and 0 <= self.top_logprobs <= 20
            and self.json_schema is None and self.regex is None and self.ebnf is None and self.structural_tag is None
        )

    def _check(self, vocab_size: int | None) -> None:
        """Every check, in order, each with its message (verify's slow path)."""
        def num(name, v, kinds=(int, float)):
            if isinstance(v, bool) or not isinstance(v, kinds):
                what = "an integer" if kinds == (int,) else "a number"
                raise SamplingParamsError(f"{name} must be {what}, got {v!r}.")
            # NaN slips through every range check below (all comparisons are False) and inf
            # temperature would pass too, so reject non-finite values here.
            if not math.isfinite(v):
                raise SamplingParamsError(f"{name} must be a finite number, got {v!r}.")

        num("temperature", self.temperature)
        num("top_p", self.top_p)
        num("min_p", self.min_p)
        num("frequency_penalty", self.frequency_penalty)
        num("presence_penalty", self.presence_penalty)
        num("repetition_penalty", self.repetition_penalty)
        num("top_k", self.top_k, (int,))
        num("min_new_tokens", self.min_new_tokens, (int,))
        if self.max_new_tokens is not None:
            num("max_new_tokens", self.max_new_tokens, (int,))
        if self.temperature < 0.0:
            raise SamplingParamsError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise SamplingParamsError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.top_k < 1 and self.top_k != -1:
            raise SamplingParamsError(f"top_k must be -1 (disable), or at least 1, got {self.top_k}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise SamplingParamsError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise SamplingParamsError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise SamplingParamsError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}.")
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise SamplingParamsError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}.")
        if self.min_new_tokens < 0:
            raise SamplingParamsError(f"min_new_tokens must be at least 0, got {self.min_new_tokens}.")
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise SamplingParamsError(
                f"min_new_tokens must be in [0, max_new_tokens({self.max_new_tokens})], got {self.min_new_tokens}."
            )
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise SamplingParamsError("stop must be a string or a list of strings.")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingParamsError(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}.")
        for s in self.stop:
            if not s:
                raise SamplingParamsError("stop strings must not be empty.")
            if len(s) > MAX_STOP_STRING_LEN:
                raise SamplingParamsError(f"stop strings may be at most {MAX_STOP_STRING_LEN} characters each, "
                                          f"got one of {len(s)}.")
        if not isinstance(self.stop_token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids
        ):
            raise SamplingParamsError("stop_token_ids must be a list of integers.")
        if vocab_size is not None:
            for t in self.stop_token_ids:
                if not 0 <= t < vocab_size:
                    raise SamplingParamsError(f"stop_token_ids holds {t}, outside the vocabulary [0, {vocab_size}).")
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(f"{name} must be a boolean, got {getattr(self, name)!r}.")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise SamplingParamsError(f"seed must be an integer, got {self.seed!r}.")
        if not isinstance(self.top_logprobs, int) or isinstance(self.top_logprobs, bool) or not 0 <= self.top_logprobs <= 20:
            raise SamplingParamsError(f"top_logprobs must be an integer in [0, 20], got {self.top_logprobs!r}.")
        grammars = [k for k in ("json_schema", "regex", "ebnf", "structural_tag") if getattr(self, k) is not None]
        for k in grammars:
            if not isinstance(getattr(self, k), str) or not getattr(self, k):
                raise SamplingParamsError(f"{k} must be a non-empty string, got {getattr(self, k)!r}.")
        if len(grammars) > 1:
            raise SamplingParamsError(f"{grammars[0]} and {grammars[1]} may not be set together: "
                                      "only one grammar constrains a request.")


_FIELD_NAMES = tuple(f.name for f in fields(SamplingParams))
_FIELD_SET = frozenset(_FIELD_NAMES)
_NUMBER = frozenset({int, float})  # exact types: bool and subclasses take verify's checks
_BIG = 2 ** 63  # ints below it convert to finite floats (math.isfinite of a huge int raises)

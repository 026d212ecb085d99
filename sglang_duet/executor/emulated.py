"""The emulated GPU: an executor that times every launch with the roofline cost model.

No model runs. A launch takes the cost model's time for its batch on its lane's SMs (all SMs
for an aggregated launch, `launch.sms` for a split lane); a k-step decode launch takes the sum
of its k steps (contexts grow by one per step) and reports each token at the end of its step.
Token ids are a hash of (request seed, position), so outputs are deterministic and never an
eos: lengths are set by max_new_tokens, as with ignore_eos.

HBM contention. SM partitions split SMs, not memory bandwidth. While two lanes overlap, each
lane's bandwidth demand is its bytes over its time alone on its partition; when the two demands
add up to more than the whole GPU's achievable bandwidth, both lanes get the same share
s = B / (D_prefill + D_decode) of what they would reach alone (`bandwidth_share` of the cost
model: memory-bound operators slow down, compute-bound ones do not). Progress is tracked as
the fraction of each launch's work done, so a launch slows only while the overlap lasts and
completion times are recomputed whenever a launch starts or ends. Token times inside a launch
are placed in proportion to their steps' standalone times (exact without overlap changes).
`contention="none"` turns this off.

Clocks. 'wall': time.monotonic (or the given clock); poll(timeout) really sleeps until the
earliest completion or the timeout, so a server serves with GPU-shaped latencies (`time_scale`
< 1 runs faster than the GPU would, for tests). 'virtual': a simulated clock that only moves
when `advance_to` or a blocking poll moves it (the discrete-event simulator).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from sglang_duet.core.plan import LaneKind, Launch, LaunchResult
from sglang_duet.executor.base import Executor

logger = logging.getLogger(__name__)

_MASK = (1 << 64) - 1
MEM_FRACTION_DEFAULT = 0.85  # as the model executor on a GPU: weights + KV share of device memory


def token_id(seed: int, position: int, lo: int, hi: int, banned: frozenset[int] = frozenset()) -> int:
    """A deterministic id in [lo, hi) for (seed, position), never in `banned` (splitmix64)."""
    x = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    x ^= x >> 31
    t = lo + x % (hi - lo)
    while t in banned:
        t = lo + (t - lo + 1) % (hi - lo)
    return t


@dataclass
class _Running:
    launch: Launch
    sms: int | None
    shape: list  # first step's (q, c) per request
    step_fracs: list[float]  # cumulative fraction of the work done at the end of each step
    alone_s: float  # duration on its SMs without contention
    demand: float  # bytes/s it pulls from HBM when alone
    started: float
    rate: float = 0.0  # fraction of the work per second, now
    done: float = 0.0  # fraction of the work done at `updated`
    updated: float = 0.0
    result: LaunchResult = field(default=None)

    def eta(self) -> float:
        return self.updated + (1.0 - self.done) / self.rate


class EmulatedExecutor(Executor):
    concurrent_lanes = True

    def __init__(self, cost_model, clock_mode: str = "wall", contention: str = "bandwidth",
                 clock=time.monotonic, time_scale: float = 1.0, token_range: tuple[int, int] | None = None,
                 banned_tokens=frozenset(), start: float = 0.0):
        if clock_mode not in ("wall", "virtual"):
            raise ValueError(f"clock_mode must be 'wall' or 'virtual', got {clock_mode!r}")
        if contention not in ("bandwidth", "none"):
            raise ValueError(f"contention must be 'bandwidth' or 'none', got {contention!r}")
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.cm = cost_model
        self.hw = cost_model.hw
        self.mode = clock_mode
        self.contention = contention
        self._wall = clock
        self.time_scale = time_scale
        self.vnow = start
        self.token_lo, self.token_hi = token_range or (0, cost_model.model.vocab_size)
        self.banned = frozenset(banned_tokens)
        self._running: dict[int, _Running] = {}
        self._done: list[LaunchResult] = []
        self.busy_s = {"aggregated": 0.0, "prefill": 0.0, "decode": 0.0}  # emulated lane time, for stats

    # ---- clock ------------------------------------------------------------------------------
    def now(self) -> float:
        return self.vnow if self.mode == "virtual" else self._wall()

    def advance_to(self, t: float) -> None:
        """Virtual mode: move the clock forward (completions up to t become pollable)."""
        if self.mode != "virtual":
            raise RuntimeError("advance_to is for the virtual clock")
        self._settle(t)
        self.vnow = max(self.vnow, t)

    def next_completion(self) -> float | None:
        if self._done:
            return self.now()
        return min((r.eta() for r in self._running.values()), default=None)

    def busy(self) -> bool:
        return bool(self._running or self._done)

    # ---- launches ---------------------------------------------------------------------------
    def submit(self, launch: Launch) -> None:
        now = self.now()
        self._settle(now)
        sms = None if launch.lane == LaneKind.AGGREGATED else launch.sms
        steps = max(w.steps for w in launch.work)
        shape = [(len(w.input_ids), w.start_pos) for w in launch.work]
        step_s, total_bytes = [], 0.0
        for j in range(steps):
            # Step j of a look-ahead decode: each request still stepping has one more cached token.
            sj = shape if j == 0 else [(1, w.start_pos + j) for w in launch.work if w.steps > j]
            ops = self.cm.breakdown(sj, sms)
            step_s.append(sum(o.time for o in ops))
            total_bytes += sum(o.bytes for o in ops)
        alone = sum(step_s) * self.time_scale
        acc, fracs = 0.0, []
        for s in step_s:
            acc += s
            fracs.append(acc / sum(step_s))
        run = _Running(launch, sms, shape, fracs, alone, total_bytes / max(sum(step_s), 1e-12), now, updated=now)
        run.result = LaunchResult(launch.launch_id, started_at=now)
        self._progress(now)  # the other lane ran at its old rate until now
        self._running[launch.launch_id] = run
        self._rerate()

    def poll(self, timeout: float | None = None) -> list[LaunchResult]:
        """Finished launches; waits until the earliest completion or `timeout` seconds."""
        now = self.now()
        self._settle(now)
        if not self._done and self._running and (timeout is None or timeout > 0):
            eta = min(r.eta() for r in self._running.values())
            until = eta if timeout is None else min(eta, now + timeout)
            if self.mode == "virtual":
                self.advance_to(until)
            else:
                wait = until - self._wall()
                if wait > 0:
                    time.sleep(wait)
                self._settle(self._wall())
        out, self._done = self._done, []
        return out

    # ---- progress model ---------------------------------------------------------------------
    def _settle(self, t: float) -> None:
        """Apply every completion up to time t, in order, re-rating the lanes at each."""
        while self._running:
            run = min(self._running.values(), key=_Running.eta)
            end = run.eta()
            if end > t + 1e-12:
                break
            self._progress(end)
            del self._running[run.launch.launch_id]
            self._finish(run, end)
            self._rerate()

    def _progress(self, t: float) -> None:
        for r in self._running.values():
            if t > r.updated:
                r.done = min(1.0, r.done + (t - r.updated) * r.rate)
                r.updated = t

    def _rerate(self) -> None:
        runs = list(self._running.values())
        share = 1.0
        if self.contention == "bandwidth" and len(runs) > 1:
            demand = sum(r.demand for r in runs)
            share = min(1.0, self.hw.bandwidth() / demand) if demand > 0 else 1.0
        for r in runs:
            if share < 1.0:
                slow = self.cm.batch_time(r.shape, r.sms, share) / max(self.cm.batch_time(r.shape, r.sms), 1e-12)
            else:
                slow = 1.0
            r.rate = 1.0 / (r.alone_s * slow) if r.alone_s > 0 else math.inf

    def _finish(self, run: _Running, end: float) -> None:
        res, launch = run.result, run.launch
        res.finished_at = end
        span = end - run.started
        self.busy_s[launch.lane.value] += span
        for w in launch.work:
            if not w.sample:
                continue
            pos = w.start_pos + len(w.input_ids)  # position of the first sampled token
            res.tokens[w.rid] = [token_id(w.sampling_seed, pos + j, self.token_lo, self.token_hi, self.banned)
                                 for j in range(w.steps)]
            res.token_times[w.rid] = [run.started + span * run.step_fracs[j] for j in range(w.steps)]
            if w.params is not None and getattr(w.params, "logprobs", False):
                # No logits here: report the emitted token as certain (logprob 0), top list empty.
                res.logprobs[w.rid] = [{"token_id": t, "logprob": 0.0, "top": []} for t in res.tokens[w.rid]]
        self._done.append(res)


def emulated_kv_slots(cost_model, mem_fraction: float | None = None) -> int:
    """KV token slots the emulated GPU holds: its memory share minus the weights."""
    model, hw = cost_model.model, cost_model.hw
    free = hw.memory_bytes * (mem_fraction or MEM_FRACTION_DEFAULT) - model.num_params() * cost_model.b
    if free <= 0:
        raise ValueError(f"--executor emulated: {model.name} does not fit in {hw.name}'s memory "
                         f"({hw.memory_bytes / 1e9:.0f} GB); pass --max-total-tokens")
    return int(free // model.kv_bytes_per_token(cost_model.b))


def build_emulated(engine_core, args) -> None:
    """EngineCore hook for `--executor emulated`: model config, tokenizer, KV size, executor."""
    from sglang_duet.cost_model.hardware import HardwareSpec, configs_dir
    from sglang_duet.cost_model.roofline import CostModel
    from sglang_duet.models.config import ModelConfig

    cfg_path = args.model_config or str(configs_dir() / "models" / "qwen3-8b.json")
    model_config = ModelConfig.from_path(cfg_path)
    hw = HardwareSpec.load(args.hardware)
    cm = CostModel(model_config, hw)
    tokenizer, tok_dir = _embedded_tokenizer()
    slots = args.max_total_tokens + 1 if args.max_total_tokens else emulated_kv_slots(cm, args.mem_fraction_static)
    if tokenizer is not None:
        # Emit ids the tokenizer can decode, above its special tokens (which include its eos).
        special = [i for i in tokenizer.all_special_ids if i is not None]
        special += list(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        lo, hi = (max(special) + 1 if special else 0), len(tokenizer)
    else:
        lo, hi = 0, model_config.vocab_size
    banned = set(model_config.eos_token_ids) | {getattr(tokenizer, "eos_token_id", None)} - {None}
    extra = getattr(args, "extra", None) or {}
    engine_core.model_config = model_config
    engine_core.tokenizer = tokenizer
    engine_core.chat_template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    engine_core.model_dir = tok_dir
    engine_core.kv_slots = int(slots)
    engine_core.input_vocab_size = hi  # prompts are tokenized by the embedded tokenizer, whatever the config
    engine_core.executor = EmulatedExecutor(
        cm, clock_mode="wall", contention=extra.get("emulated_contention", "bandwidth"),
        clock=engine_core.clock, time_scale=float(extra.get("emulated_time_scale", 1.0)),
        token_range=(lo, hi), banned_tokens=banned,
    )
    engine_core.device = f"emulated:{hw.name}"
    logger.info("emulated GPU: %s on %s (%s), %d KV slots, token ids in [%d, %d)", model_config.name, hw.name,
                hw.source, slots, lo, hi)


def _embedded_tokenizer():
    """The embedded default model's tokenizer (so the server can return text), or (None, None)."""
    try:
        from transformers import AutoTokenizer

        from sglang_duet.model_loader.embedded import default_model_path

        path = default_model_path()
        return AutoTokenizer.from_pretrained(path, local_files_only=True), path
    except Exception as e:  # noqa: BLE001 - text output is a convenience; token ids still work
        logger.warning("emulated executor: no tokenizer (%s); responses carry token ids only", e)
        return None, None

"""The default policy on a CPU: mixed chunked prefill, its token budget sized from the CPU's speed.

With no `--policy`, a CPU server ran `aggregated`: prefill-only steps of 512 tokens while a prompt
waits, so a 3000-token prompt froze every running stream for six steps of about a second each
(SmolLM2-135M on 2 cores). vLLM and SGLang users expect a long prompt to share each step with the
running decodes instead. So on a CPU (`--executor model`, not a disaggregated instance) an unset
`--policy` is `chunked` (every decode plus a prefill chunk each step), and an unset
`--chunked-prefill-size` is the largest budget whose step the calibrated cost model
(`cpu_calibration.py`) predicts within the TBT target (`--tbt-slo-ms`, default 100 ms): a
reference step of REFERENCE_DECODES running decodes and the rest of the budget as a chunk of a long
prompt, all at REFERENCE_CONTEXT cached tokens, the budget a multiple of BUDGET_STEP within
[MIN_BUDGET, MAX_BUDGET]. A slow CPU whose smallest step already misses the target gets the
minimum (a stream's gap is then one minimum step). Without a calibration
(SGLANG_DUET_CPU_COST_MODEL=0, or the timing failed) the budget is the fixed CPU default (512).

The budget protects running streams; while more requests wait for their first token than streams
decode, the default policy's steps take CPU_SURGE_TOKENS of prefill instead (the `surge_tokens` option of
`chunked`, policies/chunked.py): a burst of 16 prompts of 128 tokens on the 2-core Zen 4 machine, 16 at a
time, went from a median TPOT of 64.5 ms and TTFT 0.57 s (64-token chunks through every running stream)
to 41.3 ms and 1.7 s, 205 -> 238 tokens/s (in-process, benchmark/results/cpu_vs_peer-cpu2-vllm-bf16.md).
A `--policy-config` file's `surge_tokens` wins (0: off).

An explicit `--policy` or `--chunked-prefill-size` always wins; `--chunked-prefill-size` alone keeps
the chunked default with that budget. Elsewhere (a GPU, the emulated executor, a prefill or decode
instance) an unset `--policy` is `aggregated`, as before.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)

MIN_BUDGET = 64
MAX_BUDGET = 8192  # SGLang's GPU default: a CPU fast enough for more gains little from it
BUDGET_STEP = 64
REFERENCE_DECODES = 4  # a few streams decoding beside the prompt...
REFERENCE_CONTEXT = 1024  # ...at this many cached tokens each, and the chunk after as many of its prompt
DEFAULT_POLICY_ELSEWHERE = "aggregated"  # a GPU, the emulated executor, disaggregated instances
CPU_DEFAULT_POLICY = "chunked"
CPU_SURGE_TOKENS = 2048  # a 16 x 128-token burst in one step (~1.3 s bf16, ~3 s float32 on 2 cores)


@dataclass(frozen=True)
class BudgetChoice:
    """A prefill token budget and the reference step's predicted time at it."""

    tokens: int
    predicted_ms: float
    target_ms: float
    limited_by: str  # "target" | "minimum" (even it misses the target) | "maximum"


def reference_step(budget: int, decodes: int, context: int) -> list[tuple[int, int]]:
    """The step the budget is sized for, as the cost model's [(new tokens, cached tokens), ...]: the
    decodes' tokens first (the chunked policy's decode-first batch), the rest one prefill chunk."""
    return [(max(1, budget - decodes), context)] + [(1, context)] * decodes


def budget_for_target(cost_model, target_ms: float, decodes: int = REFERENCE_DECODES,
                      context: int = REFERENCE_CONTEXT, lo: int = MIN_BUDGET, hi: int = MAX_BUDGET,
                      step: int = BUDGET_STEP) -> BudgetChoice:
    """The largest budget (a multiple of `step` in [lo, hi]) whose reference step
    `cost_model.batch_time` predicts within `target_ms`; `lo` when none is. A step's time grows
    with its tokens, so this is a binary search over the multiples."""
    if not 0 < lo <= hi or lo % step or hi % step:
        raise ValueError(f"budget range [{lo}, {hi}] must be positive multiples of {step}")

    def ms(budget: int) -> float:
        return cost_model.batch_time(reference_step(budget, decodes, context)) * 1e3

    if ms(lo) > target_ms:
        return BudgetChoice(lo, ms(lo), target_ms, "minimum")
    if ms(hi) <= target_ms:
        return BudgetChoice(hi, ms(hi), target_ms, "maximum")
    good, bad = lo // step, hi // step  # ms(good * step) fits, ms(bad * step) does not
    while bad - good > 1:
        mid = (good + bad) // 2
        if ms(mid * step) <= target_ms:
            good = mid
        else:
            bad = mid
    return BudgetChoice(good * step, ms(good * step), target_ms, "target")


@dataclass(frozen=True)
class DefaultPolicy:
    """What an unset --policy / --chunked-prefill-size resolved to, and why (start-up log,
    /get_server_info's policy_info.default)."""

    policy: str
    chunked_prefill_size: int
    source: str  # "cpu-calibration" | "flag" | "fixed"
    reason: str
    #: the policy's options unless --policy-config sets them
    options: dict = dataclasses.field(default_factory=lambda: {"surge_tokens": CPU_SURGE_TOKENS})

    def describe(self) -> dict:
        return dataclasses.asdict(self)


def _reference_shape(engine, args) -> tuple[int, int]:
    """REFERENCE_DECODES and REFERENCE_CONTEXT within what this server can hold."""
    context = min(REFERENCE_CONTEXT, max(1, engine.context_length // 2))
    decodes = min(REFERENCE_DECODES, args.max_running_requests or REFERENCE_DECODES)
    return decodes, context


def resolve_default_policy(engine, args):
    """`args` with an unset --policy (and, on a CPU, --chunked-prefill-size) filled in, and the
    DefaultPolicy saying why (None when --policy was given). Called by EngineCore once the model and
    its executor exist (the calibration times them) and before the policy is built; the calibrated
    cost model is kept on `engine.cpu_cost_model` so the policy gets the same one."""
    if args.policy is not None:
        return args, None
    on_cpu = args.executor == "model" and str(getattr(engine, "device", "")).startswith("cpu")
    if not on_cpu or args.disaggregation_mode != "null":
        return dataclasses.replace(args, policy=DEFAULT_POLICY_ELSEWHERE), None
    args = dataclasses.replace(args, policy=CPU_DEFAULT_POLICY)
    if args.chunked_prefill_size is not None:
        choice = DefaultPolicy(CPU_DEFAULT_POLICY, args.chunked_prefill_size, "flag",
                               f"--chunked-prefill-size {args.chunked_prefill_size} as given")
        return args, _logged(choice)
    from sglang_duet.model_loader.serving_config import CPU_PREFILL_BUDGET

    from .cpu_calibration import COST_MODEL_ENV, calibrated_cost_model
    from .hardware import HardwareSpec

    fixed = dataclasses.replace(args, chunked_prefill_size=CPU_PREFILL_BUDGET)
    if os.environ.get(COST_MODEL_ENV, "1") == "0":
        return fixed, _fixed(f"{COST_MODEL_ENV}=0 turns the CPU calibration off")
    try:
        cm = calibrated_cost_model(engine, HardwareSpec.load(args.hardware), policy=args.policy)
    except Exception as e:  # noqa: BLE001 - serving does not depend on the calibration
        logger.warning("CPU calibration failed: %s", e, exc_info=logger.isEnabledFor(logging.DEBUG))
        cm, why = None, f"the CPU calibration failed ({type(e).__name__}: {e})"
    else:
        why = "no CPU calibration for this setup"
    if cm is None:
        return fixed, _fixed(why)
    engine.cpu_cost_model = cm
    decodes, context = _reference_shape(engine, args)
    b = budget_for_target(cm, args.tbt_slo_ms, decodes, context)
    step = f"{decodes} decodes + a {b.tokens - decodes}-token chunk at {context} cached tokens"
    if b.limited_by == "minimum":
        why = (f"the minimum: even {step} is predicted at {b.predicted_ms:.0f} ms, over the TBT target "
               f"{b.target_ms:g} ms (--tbt-slo-ms)")
    elif b.limited_by == "maximum":
        why = f"the maximum: {step} is predicted at {b.predicted_ms:.0f} ms, within {b.target_ms:g} ms (--tbt-slo-ms)"
    else:
        why = (f"the largest whose step ({step}) this CPU's calibrated cost model predicts within the TBT "
               f"target {b.target_ms:g} ms (--tbt-slo-ms): {b.predicted_ms:.0f} ms")
    args = dataclasses.replace(args, chunked_prefill_size=b.tokens)
    return args, _logged(DefaultPolicy(CPU_DEFAULT_POLICY, b.tokens, "cpu-calibration", why))


def _fixed(why: str) -> DefaultPolicy:
    from sglang_duet.model_loader.serving_config import CPU_PREFILL_BUDGET

    return _logged(DefaultPolicy(CPU_DEFAULT_POLICY, CPU_PREFILL_BUDGET, "fixed",
                                 f"the fixed CPU default, not sized to this CPU: {why}"))


def _logged(choice: DefaultPolicy) -> DefaultPolicy:
    logger.info("no --policy on a CPU: %s (mixed chunked prefill, options %s), --chunked-prefill-size %d: %s",
                choice.policy, choice.options, choice.chunked_prefill_size, choice.reason)
    return choice

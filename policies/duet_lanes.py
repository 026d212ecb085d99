"""duet's lane-pair states and what it does when one of its two lanes is busy (policies/duet.py
describes the states and the moves): the decode lane stepping beside a running prefill, and the
prefill lane launching beside a running decode launch, each unless a joint re-plan is worth more."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum

from sglang_duet.policies.base import LaneBatch, LaneKind, SchedulerView, StepPlan, lookahead_cap_of
from sglang_duet.policies.duet_search import Search


class LanePair(str, Enum):
    """Which of the two split lanes are free when the policy is asked (aggregated needs both)."""

    BOTH_IDLE = "both idle"
    PREFILL_RUNNING_DECODE_IDLE = "prefill running, decode idle"
    DECODE_RUNNING_PREFILL_IDLE = "decode running, prefill idle"


class Move(str, Enum):
    LAUNCH = "launch"
    WAIT_FOR_PARTNER = "wait for partner"  # leave the idle lane idle until the busy one ends: joint re-plan
    NOTHING_TO_DO = "nothing to do"


@dataclass
class Decision:
    state: LanePair
    move: Move
    reason: str
    plan: StepPlan | None = None
    candidates: int = 0  # how many were priced
    parts: dict = field(default_factory=dict)  # lane -> (compute ms, memory ms) of what it launches, unscaled


class OneLaneBusy:
    """DuetPolicy's moves when one lane is busy (a mixin: it reads the policy's search, decode
    summaries, calibration and limits)."""

    def _partition_stays(self, s: Search, sd: int) -> tuple[int | None, int | None]:
        """(best feasible split on S_d = sd, best overall) of a search, by index."""
        here = None
        g = self._grid_index.get(sd)
        nb = len(s.split_budgets)
        if s.kept is not None and s.kept[0] == sd:  # found by the compiled search
            here = s.kept[1]
        elif g is not None and nb:  # the splits on S_d = sd: nb candidates in a row
            lo = len(s.agg_budgets) + g * nb
            here = s.best(s.feasible[lo:lo + nb] & (s.tokens[lo:lo + nb] > 0), lo)
        return here, s.best()

    def _decode_lane_alone(self, view: SchedulerView) -> Decision:
        """The prefill lane holds its SMs: decode on the rest until about when the prefill ends."""
        state = LanePair.PREFILL_RUNNING_DECODE_IDLE
        dec = self._decodes(view)
        if not dec.n:
            return Decision(state, Move.NOTHING_TO_DO, "no ready decodes")
        busy = view.inflight[LaneKind.PREFILL]
        sd = self.total - (busy.sms or self.total - self.grid[0])
        left = self._left_ms(view, LaneKind.PREFILL, busy)
        k_cap = lookahead_cap_of(view, dec.n, dec.longest, self.k_max)
        # With prompts waiting, the joint search (whether the partition stays, below) runs in nearly
        # every plan, and it prices this lane's steps on S_d = sd with the same numbers: read them there.
        s = self.search(view, dec, keep_sd=sd) if view.waiting or view.prefilling else None
        off = s.decode_steps_at(self._grid_index.get(sd)) if s is not None else None
        if off is not None:
            priced, read_parts = s.priced, s.kept_decode_parts
        else:
            priced, off, read_parts = self._decode_steps(dec, sd, k_cap + 2), 0, lambda k: None
        c = self.calibration[LaneKind.DECODE]
        td = priced.t[off:off + k_cap + 2].tolist()
        cum = list(itertools.accumulate(td))
        first_limit, limit = self._limits(dec.waited_ms)
        fit = 0  # steps that end before the prefill does
        while fit < k_cap and cum[fit] <= left and td[fit] <= limit:
            fit += 1
        r = left - (float(cum[fit - 1]) if fit else 0.0)  # what is left of the prefill after them
        joins = any(w.sample for w in busy.work)  # the prefill completes requests: they join after our launch
        nxt = td[fit]
        over = nxt - r + td[fit + 1] if joins else 0.0  # a joiner's first gap if we step past the prefill's end

        def launch(k: int, why: str) -> Decision:
            ok = td[0] <= first_limit and td[k - 1] <= limit
            plan = StepPlan(decode_lane=LaneBatch(decode=dec.ids, steps=k), decode_sms=sd,
                            predicted_ms={"decode": float(cum[k - 1])})
            return Decision(state, Move.LAUNCH, f"S_d={sd} k={k} ({float(cum[k - 1]):.1f} ms), prefill busy "
                                                f"{left:.1f} ms more: {why}"
                                                + ("" if ok else "; partition too small for the SLO"), plan,
                            parts={LaneKind.DECODE: read_parts(k) or priced.parts(off, off + k, c.a, c.b)})

        if fit == k_cap:
            return launch(fit, "all within the prefill")
        meet = r <= self.sync_fraction * nxt
        why_meet = None  # formatted only when the lanes meet (most plans step past the prefill)
        if not meet and s is not None:
            # Stepping past the prefill's end keeps the partition for the prefill lane's next chunk;
            # meet it instead if a joint plan would change the partition.
            here, best = self._partition_stays(s, sd)
            if here is None or (best != here and best is not None):
                meet, why_meet = True, "a joint plan would change the partition"
        if meet:
            why_meet = why_meet or f"the prefill ends {r:.1f} ms after {fit} steps"
            if fit:
                return launch(fit, f"then meet the prefill ({why_meet})")
            if dec.waited_ms + left + nxt <= limit:
                return Decision(state, Move.WAIT_FOR_PARTNER, f"prefill ends in {left:.1f} ms: plan both lanes "
                                                              f"then ({why_meet})")
        # Step once past the prefill's end (the lanes keep running side by side; the prefill lane
        # decides then whether to re-plan), unless a request it completes would wait too long.
        if over <= limit and nxt <= limit:
            return launch(fit + 1, f"one step past its end (joiners' gap {over:.1f} ms)")
        if fit:
            return launch(fit, "then meet the prefill (stepping past it would keep joiners too long)")
        wait_gap = dec.waited_ms + left + nxt
        if wait_gap <= min(limit, over):
            return Decision(state, Move.WAIT_FOR_PARTNER, f"prefill ends in {left:.1f} ms: waiting ({wait_gap:.1f} ms "
                            f"gap) beats stepping past it ({over:.1f} ms for joiners)")
        return launch(1, "best effort")

    def _prefill_lane_alone(self, view: SchedulerView) -> Decision:
        """The decode lane holds its SMs: the next chunk on the rest, unless a joint re-plan is worth it."""
        state = LanePair.DECODE_RUNNING_PREFILL_IDLE
        if not view.waiting and not view.prefilling:
            return Decision(state, Move.NOTHING_TO_DO, "no prefill work")
        busy = view.inflight[LaneKind.DECODE]
        sd = busy.sms or self.grid[0]
        left = self._left_ms(view, LaneKind.DECODE, busy)
        s = self.search(view, self._projected_decodes(view, busy, left), keep_sd=sd)
        here, best = self._partition_stays(s, sd)
        if here is None:
            return Decision(state, Move.WAIT_FOR_PARTNER, f"no feasible split keeps S_d={sd} (decode lane busy "
                                                          f"{left:.1f} ms more): plan both lanes then", candidates=len(s))
        c = s.candidate(here)
        if left <= self.sync_fraction * c.step_ms:
            return Decision(state, Move.WAIT_FOR_PARTNER, f"decode lane ends in {left:.1f} ms, within "
                            f"{self.sync_fraction:g} of a {c.step_ms:.1f} ms chunk: plan both lanes then",
                            candidates=len(s))
        if best != here and s.score[best] > s.score[here] * (1 + self.hysteresis):
            b = s.candidate(best)
            return Decision(state, Move.WAIT_FOR_PARTNER,
                            f"a joint plan ({b.mode}" + (f" S_d={b.decode_sms}" if b.decode_sms else "")
                            + f", score {b.score:.3f}) beats keeping S_d={sd} ({c.score:.3f}): re-plan in "
                            f"{left:.1f} ms", candidates=len(s))
        if s.prefix.completes(c.prefill_tokens):
            # The requests this chunk completes join when the decode lane's launch in flight at the
            # chunk's end ends: that wait plus their first step, with steps of about the pace.
            nxt = c.pace_ms
            if c.step_ms <= left:
                joiner = left - c.step_ms + nxt
            else:
                r = (c.step_ms - left) % nxt
                joiner = min(r + nxt, 2 * nxt - r)
            if joiner > self.margin * self.slo_ms:
                return Decision(state, Move.WAIT_FOR_PARTNER,
                                f"requests this chunk completes would wait ~{joiner:.1f} ms for S_d={sd}'s steps: "
                                "plan both lanes then", candidates=len(s))
        plan = StepPlan(prefill_lane=LaneBatch(prefill=c.prefill), prefill_sms=self.total - sd,
                        predicted_ms={"prefill": c.step_ms})
        return Decision(state, Move.LAUNCH, f"S_p={self.total - sd} b={c.budget} {c.prefill_tokens} tokens "
                                            f"({c.step_ms:.1f} ms), decode busy {left:.1f} ms more; keeping S_d={sd} "
                                            f"(score {c.score:.3f}, best {s.score[best]:.3f})", plan, len(s),
                                            parts={LaneKind.PREFILL: s.parts_of(here)[LaneKind.PREFILL]})

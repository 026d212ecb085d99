"""What an executor must know to run a launch planned while the one before it still ran.

With overlap scheduling (SchedulerCore's CoreConfig.overlap) the core plans step N+1 before it has
applied step N's results. Two things are then not in the launch's ReqWork yet:
  * the input id of a decode row (FUTURE_TOKEN, `input_from` names the launch that samples it);
  * the tail of the output history: `output_ids` is the core's live list, which lags behind the
    launches in flight; penalties, the min_new_tokens ban and the seeded noise need the whole
    history up to `output_pos`.
Executors run a lane's launches in order, so by the time launch N+1 runs, launch N has sampled
its tokens: `SampledTokens` keeps the last few launches' tokens per request to fill both gaps.
On a GPU the ids may stay on the device (the input gathered from N's output tensor); this keeps
the host's copy for the executors that read them anyway.
"""
from __future__ import annotations

from collections import OrderedDict

from sglang_duet.core.plan import FUTURE_TOKEN, ReqWork

KEEP_LAUNCHES = 4  # an overlapped launch only ever reads the one right before it on its lane


class SampledTokens:
    def __init__(self) -> None:
        self._by_launch: OrderedDict[int, dict[str, list[int]]] = OrderedDict()

    def record(self, launch_id: int, tokens: dict[str, list[int]]) -> None:
        """The tokens a launch sampled, per request (as its result reports them)."""
        self._by_launch[launch_id] = tokens
        while len(self._by_launch) > KEEP_LAUNCHES:
            self._by_launch.popitem(last=False)

    def resolve(self, work: list[ReqWork]) -> None:
        """Replace FUTURE_TOKEN inputs by the last token their `input_from` launch sampled."""
        for w in work:
            if w.input_from is not None and w.input_ids and w.input_ids[0] == FUTURE_TOKEN:
                toks = self._by_launch.get(w.input_from, {}).get(w.rid)
                if not toks:
                    raise RuntimeError(f"launch input for {w.rid!r} comes from launch {w.input_from}, "
                                       "which this executor has not run (launches must run in order)")
                w.input_ids = [toks[-1]]

    def history(self, w: ReqWork) -> list[int]:
        """The request's output tokens before this launch's first sampled one (`output_pos` of them)."""
        out = w.output_ids
        missing = w.output_pos - len(out)
        if missing <= 0:
            return out if missing == 0 else out[:w.output_pos]
        tail = self._by_launch.get(w.input_from, {}).get(w.rid, []) if w.input_from is not None else []
        if len(tail) < missing:
            raise RuntimeError(f"{w.rid!r}: {missing} output tokens in flight are unknown to this executor")
        return out + tail[len(tail) - missing:]

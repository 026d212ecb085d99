"""The model executor on a CUDA GPU: eager prefill/mixed launches, CUDA-graph decode launches.

`GPUModelExecutor` extends `ModelExecutor` (whose eager loop it keeps for prefill, mixed
batches and anything the graph path cannot express) with a decode path through
`CudaGraphDecodeRunner`: every step of a k-step decode launch replays a captured graph, the
sampled ids stay on the device and are fed back as the next step's input ids, and the host
reads all k steps' ids once at the end (the launch's only host sync).

Token times. This executor is single-lane and synchronous: the launch runs to its end inside
`submit`, on the scheduler's thread, so the k tokens of a decode launch reach the host, and the
client, together, at that one read. Their `token_times` are that read's host time (what a user
sees: a burst of k tokens), not the time each step finished on the device. The device times
(CUDA events after each step, mapped onto the host clock) are kept for comparison in
`deliveries`. Delivering each step when it completes needs a scheduler thread that is free while
the launch runs: the two-lane executor (duet_executor.py) does that.

A decode launch takes the graph path when every row adds one token and samples, the batch fits
the largest bucket, and no row needs what the device sampler does not do (penalties, an active
min_new_tokens ban, logprobs): those run eagerly with the CPU-semantics `Sampler`.

Slot indices come from the executor's req-to-token table (`self.table`, sglang_duet/memory/
req_to_token.py): at each launch only the slots appended since the previous one are copied to the
device, and every step's out_cache_loc / kv_indices are gathered there (the graph runner's static
buffers, or the eager ForwardBatch), O(batch) host work per step. Work without table rows (built
by hand) falls back to the slot lists.

`build_model_executor` is the factory the engine calls: the plain ModelExecutor on a CPU, this
class on a GPU (graphs unless disabled or the backend cannot be captured).

`EventTimer` (marks on the current stream read as host times, without a host sync) serves the
two-lane executor (duet_executor.py), whose lanes are timed from events on their own streams.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sglang_duet.core.plan import Launch, LaunchResult, ReqWork
from sglang_duet.executor.model_executor import Delivery, ModelExecutor
from sglang_duet.kernels import gpu_sampling
from sglang_duet.kernels.cuda_graph import DEFAULT_MAX_BS, CudaGraphDecodeRunner, supports_graphs
from sglang_duet.memory.req_to_token import ReqToTokenTable
from sglang_duet.sampling.penalties import has_penalty

# SGLANG_DUET_CPU_COMPILE=0: a CPU model runs every step eagerly (--disable-torch-compile); the tests' default
CPU_COMPILE_ENV = "SGLANG_DUET_CPU_COMPILE"

logger = logging.getLogger(__name__)

REANCHOR_S = 10.0  # re-map GPU event time onto the host clock this often (clock drift)


class GPUModelExecutor(ModelExecutor):
    def __init__(self, model, kv_pool, attn_backend, device: torch.device, clock=time.monotonic,
                 graph_runner: CudaGraphDecodeRunner | None = None, req_to_token=None):
        super().__init__(model, kv_pool, attn_backend, device, clock=clock, req_to_token=req_to_token)
        self.graphs = graph_runner
        self.vocab = model.config.vocab_size
        self._events = device.type == "cuda"

    @torch.inference_mode()
    def run(self, launch: Launch) -> LaunchResult:
        if self.graphs is not None and self.graph_eligible(launch.work):
            return self._run_graph(launch)
        return super().run(launch)

    def graph_eligible(self, work: list[ReqWork]) -> bool:
        if not work or len(work) > self.graphs.max_bs:
            return False
        for w in work:
            p = w.params
            if len(w.input_ids) != 1 or not w.sample or p is None:
                return False
            if has_penalty(p) or p.logprobs or w.grammar is not None:  # grammar: host-filled bitmask
                return False
            if w.eos_ids and w.output_pos < p.min_new_tokens:
                return False
        return True

    def _run_graph(self, launch: Launch) -> LaunchResult:
        res = LaunchResult(launch.launch_id, started_at=self.clock())
        work = launch.work
        self.futures.resolve(work)
        steps = max(w.steps for w in work)
        mode = self._mode([w.params for w in work])
        ids_per_step: list[torch.Tensor] = []
        rows_per_step: list[list[ReqWork]] = []
        events: list[torch.cuda.Event] = []
        index = lambda keep: torch.tensor(keep, device=self.device)  # noqa: E731
        table = self.table if self.table.prepare(work) else None
        for ids, rows in graph_decode_steps(self.graphs, work, mode, self.vocab, index, table=table):
            ids_per_step.append(ids)
            rows_per_step.append(rows)
            if self._events:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                events.append(ev)
        flat = torch.cat(ids_per_step).tolist()  # the one host sync of the launch
        now = self.clock()
        sampled: dict[str, list[int]] = {w.rid: [] for w in work}
        i = 0
        for rows in rows_per_step:
            for w in rows:
                sampled[w.rid].append(flat[i])
                i += 1
        self.futures.record(launch.launch_id, sampled)
        res.tokens = sampled
        res.logprobs = {}
        # Delivered at the read, all k together (see the module docstring); device times go to the log.
        res.token_times = {rid: [now] * len(toks) for rid, toks in sampled.items()}
        res.finished_at = now
        times = self._step_times(events, now, steps)
        self.deliveries.extend(Delivery(launch.lane.value, launch.launch_id, j, len(rows), times[j], now)
                               for j, rows in enumerate(rows_per_step))
        return res

    @staticmethod
    def _step_times(events: list, end_host: float, steps: int) -> list[float]:
        """Host-clock time of each step's completion: the last event is 'now' (we just synced)."""
        if not events:
            return [end_host] * steps
        last = events[-1]
        return [end_host - ev.elapsed_time(last) / 1000.0 for ev in events]

    def _mode(self, params: list) -> str:
        if all(p.is_greedy for p in params):
            return "greedy"
        return "filtered" if gpu_sampling.needs_filters(params, self.vocab) else "sample"


# ---- device time -> host time ---------------------------------------------------------------------

@dataclass
class _HostMark:
    """A completion marker for work already finished on the host (CPU, or a lane that synced)."""

    t: float

    def query(self) -> bool:
        return True


@dataclass
class _Mark:
    event: object  # torch.cuda.Event(enable_timing=True)
    anchor: tuple  # (anchor event, host time of the anchor) current when this mark was recorded

    def query(self) -> bool:
        return self.event.query()


class EventTimer:
    """Marks on the current stream (CUDA events, or host timestamps on a CPU), read as host times.

    An anchor event recorded on an idle stream completes within microseconds; the host time at
    which it is seen complete maps every later event: t = t_anchor + anchor.elapsed_time(event).
    Re-anchoring every REANCHOR_S bounds the drift between the GPU and host clocks; a mark keeps
    the anchor that was current when it was recorded (always an earlier event)."""

    def __init__(self, device: torch.device, clock: Callable[[], float] = time.monotonic):
        self.cuda = device.type == "cuda"
        self.clock = clock
        self.device = device
        self._anchor = None
        if self.cuda:
            self._stream = torch.cuda.Stream(device)
            self._reanchor()

    def _reanchor(self) -> None:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(self._stream)
        while not ev.query():
            pass
        self._anchor = (ev, self.clock())

    def maybe_reanchor(self) -> None:
        if self.cuda and self.clock() - self._anchor[1] > REANCHOR_S:
            self._reanchor()

    def mark(self):
        if not self.cuda:
            return _HostMark(self.clock())
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()  # on the current stream: the lane's
        return _Mark(ev, self._anchor)

    def host_time(self, mark) -> float:
        if isinstance(mark, _HostMark):
            return mark.t
        anchor, t0 = mark.anchor
        return t0 + anchor.elapsed_time(mark.event) / 1e3


def graph_decode_steps(runner, work: list[ReqWork], mode: str, vocab: int, index,
                       before_launch: Callable[[], None] | None = None, out_lens: dict[str, int] | None = None,
                       table=None):
    """k decode steps back to back from captured graphs; step j's sampled ids feed step j+1 on the device.

    Yields (the step's sampled ids on the device, its rows) after each replay, so the caller can
    record its own event or mark. `index(keep)` turns a list of row positions into a device index
    tensor (how is the caller's business: a lane stream must not wait on a blocking copy).
    `before_launch` goes to runner.run: called right before each step's replay, after its host work.
    `out_lens[rid]`: the row's output length before this launch (the seeded noise's step); default
    `ReqWork.output_pos`, never len(output_ids): that is the core's live list, which lags behind the
    launches in flight and grows as this launch's parts are applied.
    `table`: the executor's ReqToTokenTable, already synced for this work (`prepare` returned True):
    each step's slots are then gathered from it on the device (O(batch) host work per step);
    None: they are flattened from the rows' kv_slots lists (O(batch x context)).
    """
    steps = max(w.steps for w in work)
    if out_lens is None:
        out_lens = {w.rid: w.output_pos for w in work}
    prev_ids, prev_rows = None, []
    for step in range(steps):
        rows = [w for w in work if w.steps > step]
        if step == 0:
            input_ids = [w.input_ids[0] for w in rows]
        elif len(rows) == len(prev_rows):
            input_ids = prev_ids
        else:  # some requests asked for fewer steps: keep the rows still running
            input_ids = prev_ids[index([i for i, w in enumerate(prev_rows) if w.steps > step])]
        positions = [w.start_pos + step for w in rows]
        seq = [p + 1 for p in positions]
        sampling = None
        if mode != "greedy":
            sampling = gpu_sampling.SamplingTensors.host_rows(
                [w.params for w in rows], [w.sampling_seed for w in rows],
                [out_lens[w.rid] + step for w in rows], vocab)
        if table is not None:
            _, ids = runner.run(input_ids, positions, None, seq, None, sampling, mode, before_launch=before_launch,
                                table=table, rows=[w.table_row for w in rows])
        else:
            out_loc = [w.kv_slots[p] for w, p in zip(rows, positions)]
            kv = [s for w, n in zip(rows, seq) for s in w.kv_slots[:n]]
            _, ids = runner.run(input_ids, positions, out_loc, seq, kv, sampling, mode, before_launch=before_launch)
        prev_ids = ids.clone()  # the static output buffer is overwritten by the next replay
        prev_rows = rows
        yield prev_ids, rows


def wants_torch_compile(args, model, device: torch.device) -> bool:
    """Whether a CPU model executor compiles its decode step (models/decode_step.py): --enable-torch-compile
    asks for it (a refusal is a warning there); else it is the default where it can run, a CPU model on one
    rank with a C++ compiler (one request 40 -> 31 ms per step, 16 requests 81 -> 73 ms, SmolLM2 at two
    threads), unless --disable-torch-compile or SGLANG_DUET_CPU_COMPILE=0."""
    if getattr(args, "enable_torch_compile", False):
        return True
    if getattr(args, "disable_torch_compile", False) or os.environ.get(CPU_COMPILE_ENV, "1") == "0":
        return False
    if torch.device(device).type != "cpu" or model.tp.size != 1:
        return False
    from sglang_duet.models.decode_step import cpp_compiler

    return cpp_compiler() is not None


def build_model_executor(model, kv_pool, attn_backend, device: torch.device, args=None, clock=time.monotonic):
    """The executor for this device: ModelExecutor on a CPU; GPUModelExecutor on a GPU, with
    CUDA-graph decode unless args.disable_cuda_graph or the backend cannot be captured.

    args: a ServerArgs (or None for defaults); reads disable_cuda_graph and, when present,
    cuda_graph_max_bs (SGLang's name; default 256).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return ModelExecutor(model, kv_pool, attn_backend, device, clock=clock,
                             req_to_token=ReqToTokenTable.for_executor(kv_pool, model.config, args, device),
                             torch_compile=wants_torch_compile(args, model, device))
    runner = None
    disabled = bool(getattr(args, "disable_cuda_graph", False))
    if not disabled and supports_graphs(attn_backend):
        max_bs = getattr(args, "cuda_graph_max_bs", None) or DEFAULT_MAX_BS
        start = time.perf_counter()
        # Static kv-index buffers: every live slot once, but never more than max_bs full contexts
        # (a tiny model can have millions of slots).
        max_ctx = model.config.max_position_embeddings
        max_kv = min(kv_pool.num_slots, max_bs * max_ctx) + max_bs
        runner = CudaGraphDecodeRunner(model, attn_backend, kv_pool, max_bs=max_bs, max_kv_tokens=max_kv)
        runner.capture(("greedy",))
        logger.info("captured %d decode graphs (max bs %d) in %.1f s", len(runner.sizes), runner.max_bs,
                    time.perf_counter() - start)
    elif not disabled:
        logger.info("attention backend %s has no CUDA-graph support: decode runs eagerly",
                    getattr(attn_backend, "name", attn_backend))
    table = ReqToTokenTable.for_executor(kv_pool, model.config, args, device)
    return GPUModelExecutor(model, kv_pool, attn_backend, device, clock=clock, graph_runner=runner,
                            req_to_token=table)

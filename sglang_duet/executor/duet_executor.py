"""Two lanes on one GPU: DuetServe's interruption-free execution.

`DuetGPUExecutor` (concurrent_lanes=True) runs

* AGGREGATED launches on all SMs, on the default stream: exactly the GPU executor's path
  (`GPUModelExecutor`: CUDA-graph decode, eager prefill / mixed batches);
* split mode: a PREFILL launch eagerly on the prefill partition's green-context stream, while
  the DECODE lane replays k captured decode graphs back to back on the decode partition's
  stream; the ids sampled at step j are step j+1's input ids on the device (the KV slots of
  all k steps were reserved by the core). Graphs are captured per (partition, batch bucket).

Completion and delivery. A lane's launch is issued by a worker thread (below) that records CUDA
events on the lane's stream: one right before each step's first kernel (after the step's host
work: building inputs, host->device copies, the attention plan) and one after the step's last
operation. On the decode lane that last operation is a non-blocking copy of the step's sampled ids
into a host buffer (pinned; one per launch in flight, see `HostIdBuffers`), so once a step's end
event has completed its ids are in host memory. `poll(timeout)` never synchronises: it queries
events (`event.query()`) and reports each completed decode step as a partial result
(`LaunchResult.final=False`, one per step, its ids read from the host buffer) as soon as it sees
it, then the launch's final part (no tokens; its device start and end) once the last step's event
has completed. A prefill (one step) is reported in one final part, read the same way. Every
token's `token_times` entry is the host time at which poll saw it: when it became visible to the
scheduler, which is what a client's TBT is measured from. The device time of each step (its event
mapped onto the host clock through an anchor event, `EventTimer`) is kept beside it in
`deliveries`. The (start, end) pairs of every step are the lane-overlap evidence (`intervals`,
`lane_overlap_s`): a mark taken before a step's host work would complete at host-issue time on an
idle stream, before any kernel, and show overlap that never happened on the device.

Slot indices. Both lanes and every path share one req-to-token table (`self.table`, see
sglang_duet/memory/req_to_token.py): a launch's worker copies the slots appended since the row was
last seen, on its lane's stream, and gathers its inputs from the table there. A lane only appends to
rows of its own launch's requests, or rewrites rows whose previous owners' launches have completed,
so it never writes what the other lane's launch in flight reads.

Lanes are joined by events only. The core hands a request to a lane only after the previous
launch touching it was applied, and that happens only once its completion event was seen, so
the KV written by a prefill on one stream is complete before a decode on another reads it.

Worker threads. One issues the AGGREGATED and DECODE lanes (they share the decode graph runner
and its attention state, and never run at the same time), one issues the PREFILL lane (its own
attention backend instance: backends keep per-step plan state). Issuing on threads keeps host
work (building batches, FlashInfer's plan, which waits for its own stream) off the scheduler's
thread and lets the two lanes issue independently. Work that cannot stay on the device (rows
needing penalties, logprobs or an active min_new_tokens ban) runs through the CPU-semantics
sampler on the lane's worker, which then waits for that lane's stream only.

The same class runs on a CPU with the `none` partitioner (no streams): each worker then computes
its launch as it issues it, one step at a time, and the "events" are host timestamps taken when a
step is computed; a step is published to poll() (which it wakes) as soon as it is, so its tokens are
delivered before the next step is computed, as on the GPU. The logic (two lanes in flight, results
at their own cadence, per-step parts, tokens identical to aggregated mode) is tested without a GPU.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from sglang_duet.core.plan import LaneKind, Launch, LaunchResult, ReqWork
from sglang_duet.distributed.parallel_state import SINGLE
from sglang_duet.executor.base import Executor
from sglang_duet.executor.gpu_executor import (
    EventTimer, GPUModelExecutor, _HostMark, build_model_executor, graph_decode_steps,
)
from sglang_duet.executor.model_executor import Delivery, ModelExecutor
from sglang_duet.kernels import gpu_sampling
from sglang_duet.kernels.attention.base import ForwardBatch
from sglang_duet.kernels.cuda_graph import DEFAULT_MAX_BS, CudaGraphDecodeRunner, _Bucket, supports_graphs
from sglang_duet.kernels.sm_partition import Partition, SMPartitioner
from sglang_duet.memory.req_to_token import ReqToTokenTable
from sglang_duet.sampling.penalties import has_penalty

logger = logging.getLogger(__name__)

SINGLE_LANE_POLICIES = frozenset({"aggregated", "chunked"})  # never plan split lanes
EVENT_POLL_S = 2e-4  # poll() re-checks pending CUDA events this often
HOST_BUFFER_STEPS = 8  # rows (decode steps) of a preallocated host id buffer; a longer launch gets its own


def _stream_ctx(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


# ---- one decode runner, graphs per partition ---------------------------------------------------------

class PartitionedDecodeRunner(CudaGraphDecodeRunner):
    """The CUDA-graph decode runner with one set of graphs per SM partition.

    A kernel captured from a green-context stream is bound to that context's SMs, so each
    partition needs its own graphs; everything else is shared: static input buffers, the
    attention backend's per-bucket state (e.g. a FlashInfer cuda-graph wrapper) and the graph
    memory pool. Sharing is safe because the decode lane and the aggregated lane never run at
    the same time and are issued from one thread. `select(key, stream)` picks the partition
    (key None: all SMs) before `run`. Captures happen lazily on first use of a (partition,
    bucket, mode), on the partition's stream, in thread-local capture mode and without a device
    synchronisation, so the other lane keeps running meanwhile (torch.cuda.graph would sync the
    whole device and forbid the other thread's CUDA calls).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._by_key: dict[int | None, dict[int, _Bucket]] = {None: self._buckets}
        self._states: dict[int, object] = {}
        self._key: int | None = None
        self._stream = None
        self._side = torch.cuda.Stream(self.device) if self.use_graphs else None  # all-SM captures

    def select(self, key: int | None, stream=None) -> None:
        """Replay (and capture) the graphs of partition `key` (None: all SMs) from now on."""
        self._key = key
        self._stream = stream
        self._buckets = self._by_key.setdefault(key, {})

    def captured(self) -> dict:
        """{partition key: {bucket: [modes]}} of the graphs captured so far."""
        out = {k: {bs: sorted(b.graphs) for bs, b in v.items() if b.graphs} for k, v in self._by_key.items()}
        return {k: v for k, v in out.items() if v}

    def _ensure(self, bs: int, mode: str) -> _Bucket:
        bucket = self._buckets.get(bs)
        if bucket is None:
            state = self._states.get(bs)
            if state is None and supports_graphs(self.attn):
                state = self._states[bs] = self.attn.graph_state(bs, self.max_kv_tokens)
            bucket = self._buckets[bs] = _Bucket(bs, state)
        if self.use_graphs and mode not in bucket.graphs:
            self._capture_on(bucket, mode, self._stream if self._stream is not None else self._side)
        return bucket

    @torch.inference_mode()
    def _capture_on(self, bucket: _Bucket, mode: str, stream) -> None:
        cur = torch.cuda.current_stream(self.device)
        stream.wait_stream(cur)  # the static buffers may have writes pending on the current stream
        with torch.cuda.stream(stream):
            fb, st = self._capture_inputs(bucket)  # written on the partition's stream
            for _ in range(2):  # lazy inits, autotuning, Triton compiles: outside the capture
                self._forward(fb, st, mode)
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=self._mempool, capture_error_mode="thread_local")
            try:
                out = self._forward(fb, st, mode)
            finally:
                graph.capture_end()
        if cur is not stream:
            cur.wait_stream(stream)
        bucket.graphs[mode] = graph
        bucket.outputs[mode] = out


# ---- launches in flight ----------------------------------------------------------------------------

class HostIdBuffers:
    """Host buffers that the lanes copy sampled ids into: [steps, rows] int64, pinned on a GPU (so the
    device->host copies are asynchronous and the lane never waits for the host).

    One buffer per launch in flight: taken by the worker that issues the launch, handed back by poll()
    at its first call after the one that returned the launch's final part (the caller applies a
    poll's results before polling again), so a buffer is never written by a launch while another's
    ids are still to be read from it. Handed-back buffers are kept (`keep`) and reused: once warm, a
    launch allocates no pinned memory. Two are allocated up front (a decode and a prefill in flight).
    """

    def __init__(self, device: torch.device, cols: int, rows: int = HOST_BUFFER_STEPS, keep: int = 4,
                 prealloc: int = 2):
        self.pin = device.type == "cuda"
        self.rows, self.cols, self.keep = rows, cols, keep
        self._lock = threading.Lock()
        self._free = [self._new(rows, cols) for _ in range(prealloc)]
        self.allocated = prealloc

    def _new(self, rows: int, cols: int) -> torch.Tensor:
        return torch.empty((rows, cols), dtype=torch.long, pin_memory=self.pin)

    def acquire(self, rows: int, cols: int) -> torch.Tensor:
        with self._lock:
            for i, b in enumerate(self._free):
                if b.shape[0] >= rows and b.shape[1] >= cols:
                    return self._free.pop(i)
            self.allocated += 1
        return self._new(max(rows, self.rows), max(cols, self.cols))

    def release(self, buf: torch.Tensor) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(buf)

    @property
    def free(self) -> int:
        return len(self._free)


@dataclass
class _Step:
    """One decode step issued: row `index` of its launch's host buffer holds its rows' ids once `end`
    has completed."""

    index: int
    start: object  # mark right before the step's first kernel
    end: object  # mark after its ids' copy to the host buffer
    rows: list  # the ReqWork rows of this step, in buffer order


@dataclass
class _Record:
    launch: Launch
    stream: object = None
    partition: Partition | None = None
    submitted_at: float = 0.0
    issued: bool = False  # the worker has queued (or, on a CPU, computed) all of the launch's work
    first: object = None  # mark right before the launch's first kernel
    done: object = None  # mark after its last operation
    step_marks: list = field(default_factory=list)  # (before first kernel, after last kernel) per step
    steps: list = field(default_factory=list)  # the same in host time, set once the launch is done
    finish: Callable[[], LaunchResult] | None = None  # builds the final part once `done` has completed
    error: BaseException | None = None
    path: str = ""  # graph | device | eager | aggregated
    on_device: bool = False  # its marks are CUDA events: poll re-checks them every event_poll_s
    parts: list = field(default_factory=list)  # _Step per decode step issued so far (published by the worker)
    sent: int = 0  # parts already reported (scheduler thread only)
    buf: torch.Tensor | None = None  # host id buffer (HostIdBuffers), handed back after the final part
    # rid -> output tokens before this launch (ReqWork.output_pos): the core's output_ids list lags
    # behind launches in flight and grows as this launch's parts are applied
    out_lens: dict = field(default_factory=dict)


@dataclass
class DuetStats:
    launches: dict = field(default_factory=lambda: {"aggregated": 0, "prefill": 0, "decode": 0})
    paths: dict = field(default_factory=lambda: {"graph": 0, "device": 0, "eager": 0, "aggregated": 0})
    max_lanes_in_flight: int = 0
    splits_used: set = field(default_factory=set)


class _LaneWorker(threading.Thread):
    """Issues one lane group's launches in order, one at a time. Under tensor parallelism the
    thread binds its lane of the TP group (`tp_lane`): its forwards' collectives and step
    broadcasts then run on that lane's process groups, concurrently with the other worker's."""

    def __init__(self, name: str, executor: "DuetGPUExecutor", tp_lane: int):
        super().__init__(name=f"duet-{name}", daemon=True)
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.ex = executor
        self.tp_lane = tp_lane

    def run(self) -> None:
        if self.ex.device.type == "cuda":
            torch.cuda.set_device(self.ex.device)
        self.ex.tp.bind_lane(self.tp_lane)
        while True:
            item = self.q.get()
            if item is None:
                return
            rec, fn = item
            try:
                with torch.inference_mode():
                    fn(rec)
            except BaseException as e:  # noqa: BLE001 - delivered to the scheduler thread by poll()
                rec.error = e
            self.ex._issued(rec)


# ---- the executor ---------------------------------------------------------------------------------

class DuetGPUExecutor(Executor):
    concurrent_lanes = True
    # Overlap scheduling: the scheduler's thread plans the next aggregated launch while the main
    # worker runs this one; the worker runs them in order and resolves the next one's inputs from
    # this one's sampled ids (executor/futures.py).
    supports_overlap = True

    def __init__(self, model, kv_pool, attn_backend, device: torch.device | str, partitioner: SMPartitioner,
                 clock: Callable[[], float] = time.monotonic, graph_runner: PartitionedDecodeRunner | None = None,
                 make_attn: Callable[[], object] | None = None, event_poll_s: float = EVENT_POLL_S,
                 req_to_token: ReqToTokenTable | None = None):
        self.model = model
        self.kv_pool = kv_pool
        self.device = _indexed(device)  # worker threads set it as their current device
        # One request-to-token table for both lanes and every path (see memory/req_to_token.py for why a
        # sync for one lane never rewrites what the other lane's launch in flight reads).
        self.table = req_to_token if req_to_token is not None else ReqToTokenTable.for_executor(
            kv_pool, model.config, device=self.device)
        self.partitioner = partitioner
        self.clock = clock
        self.vocab = model.config.vocab_size
        self.runner = graph_runner
        self.attn_main = attn_backend
        self.attn_prefill = (make_attn or _attn_factory(attn_backend, model, self.device))()
        self._q_dtype = next(model.parameters()).dtype  # activations' dtype, for a plan ahead of the forward
        # AGGREGATED: the plain GPU executor (graphs on all SMs); eager fallbacks per worker.
        self._agg = GPUModelExecutor(model, kv_pool, attn_backend, self.device, clock=clock, graph_runner=graph_runner,
                                     req_to_token=self.table)
        self._eager_main = ModelExecutor(model, kv_pool, attn_backend, self.device, clock=clock, req_to_token=self.table)
        self._eager_prefill = ModelExecutor(model, kv_pool, self.attn_prefill, self.device, clock=clock,
                                            req_to_token=self.table)
        self.timer = EventTimer(self.device, clock)
        self.event_poll_s = event_poll_s
        self.stats = DuetStats()
        # (lane, launch id, start, end) per step in host time, device-measured on a GPU: lane overlap evidence
        self.intervals: collections.deque = collections.deque(maxlen=16384)
        # per step: device time vs the host time poll saw it (token_times); one log for every path
        self.deliveries: collections.deque[Delivery] = self._agg.deliveries
        self._eager_main.deliveries = self._eager_prefill.deliveries = self.deliveries
        # One record of sampled tokens for every path, so an overlapped aggregated launch finds the
        # inputs and history its predecessor sampled, whichever path ran it (executor/futures.py).
        self._eager_main.futures = self._eager_prefill.futures = self._agg.futures
        self.buffers = HostIdBuffers(self.device, graph_runner.max_bs if graph_runner is not None else DEFAULT_MAX_BS)
        self._release: list[torch.Tensor] = []  # host buffers handed back at the next _collect
        self._inflight: dict[int, _Record] = {}
        self._cv = threading.Condition()
        self._seq = 0  # bumped by workers when a record is issued (poll's lost-wakeup guard)
        self.tp = getattr(model, "tp", SINGLE)
        if self.tp.size > 1 and self.tp.num_lanes < 2:
            raise ValueError("the two-lane executor under tensor parallelism needs a TP group with two lanes "
                             "(--lanes 2 when the ranks start)")
        self._workers = {"main": _LaneWorker("main", self, 0), "prefill": _LaneWorker("prefill", self, 1)}
        for w in self._workers.values():
            w.start()
        self._closed = False

    # ---- Executor API ------------------------------------------------------------------------------
    def submit(self, launch: Launch) -> None:
        if self._closed:
            raise RuntimeError("executor is shut down")
        stream, part = self._placement(launch)
        rec = _Record(launch, stream, part, submitted_at=self.clock(),
                      out_lens={w.rid: w.output_pos for w in launch.work})
        with self._cv:
            self._inflight[launch.launch_id] = rec
            lanes = {r.launch.lane for r in self._inflight.values()}
            self.stats.max_lanes_in_flight = max(self.stats.max_lanes_in_flight, len(lanes))
        self.stats.launches[launch.lane.value] += 1
        if part is not None:
            self.stats.splits_used.add(part.decode_sms)
        if launch.lane == LaneKind.PREFILL:
            self._workers["prefill"].q.put((rec, self._run_prefill))
        elif launch.lane == LaneKind.DECODE:
            self._workers["main"].q.put((rec, self._run_decode))
        else:
            self._workers["main"].q.put((rec, self._run_aggregated))

    def poll(self, timeout: float | None = None) -> list[LaunchResult]:
        """Finished launches; waits up to `timeout` seconds (None: until one finishes) by polling events."""
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        self.timer.maybe_reanchor()
        while True:
            with self._cv:
                seq = self._seq
            out = self._collect()
            if out or not self._inflight:
                return out
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return out
            # Records the device still works on get no notification: re-check their events soon.
            device_pending = any(r.on_device for r in self._inflight.values())
            wait = self.event_poll_s if device_pending else 1.0
            if deadline is not None:
                wait = min(wait, deadline - now)
            with self._cv:
                if self._seq == seq:
                    self._cv.wait(wait)

    def busy(self) -> bool:
        return bool(self._inflight)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._workers.values():
            w.q.put(None)
        for w in self._workers.values():
            w.join(timeout=30)

    def prepare(self, decode_sms, batch_sizes=None, modes=("greedy",)) -> None:
        """Create the splits and capture their decode graphs now (call with nothing in flight, e.g. at
        start-up), instead of lazily at their first use (a one-off stall of the decode lane)."""
        for s in decode_sms:
            part = self.partitioner.split(s)
            if self.runner is None or not self.runner.use_graphs:
                continue
            self.runner.select(part.decode_sms, part.decode_stream)
            try:
                with _stream_ctx(part.decode_stream):
                    for bs in reversed(batch_sizes or self.runner.sizes):
                        for mode in modes:
                            self.runner._ensure(self.runner.bucket_size(bs), mode)
            finally:
                self.runner.select(None)
            if part.decode_stream is not None:  # the warm-up forwards, before any launch reuses the buffers
                part.decode_stream.synchronize()  # (a device sync may not cover a green context's stream)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- placement ----------------------------------------------------------------------------------
    def _placement(self, launch: Launch) -> tuple[object, Partition | None]:
        """(stream, split) a launch runs on: the default stream for AGGREGATED; the split's decode or
        prefill stream otherwise (launch.sms from the plan; when missing, the partition of the other
        lane's launch in flight, else the smallest decode partition)."""
        if launch.lane == LaneKind.AGGREGATED:
            return None, None
        other = next((r.partition for r in self._inflight.values() if r.partition is not None), None)
        if launch.lane == LaneKind.DECODE:
            part = self.partitioner.split(launch.sms) if launch.sms else (other or self.partitioner.split(
                self.partitioner.grid()[0]))
            return part.decode_stream, part
        if launch.sms:
            part = self.partitioner.split_for_prefill(launch.sms)
        else:
            part = other or self.partitioner.split(self.partitioner.grid()[0])
        return part.prefill_stream, part

    # ---- worker side ------------------------------------------------------------------------------------
    def _issued(self, rec: _Record) -> None:
        with self._cv:
            rec.issued = True
            self._seq += 1
            self._cv.notify_all()

    def _publish(self, rec: _Record, step: _Step) -> None:
        """A decode step is issued (on a CPU: computed); poll() may report it once its end mark completes.
        poll() is woken: on a CPU the step is visible now; on a GPU poll then sees a launch on the device
        and re-checks its events every event_poll_s (issuing may be slower than the steps, e.g. a plan
        that waits for its stream, so the first step must not wait for the whole launch to be issued)."""
        with self._cv:
            if rec.first is None:
                rec.first = step.start
            rec.parts.append(step)
            self._seq += 1
            self._cv.notify_all()

    def _run_aggregated(self, rec: _Record) -> None:
        if self.runner is not None:
            self.runner.select(None)
        self._run_sync(rec, self._agg, "aggregated")

    def _run_decode(self, rec: _Record) -> None:
        work = rec.launch.work
        with _stream_ctx(rec.stream):
            if self.runner is not None and self._agg.graph_eligible(work):
                self.runner.select(rec.partition.decode_sms, rec.stream)
                self._issue_decode(rec)
            else:
                self._run_sync(rec, self._eager_main, "eager")

    def _run_prefill(self, rec: _Record) -> None:
        work = rec.launch.work
        with _stream_ctx(rec.stream):
            if all(w.steps == 1 for w in work) and all(self._device_sampling_ok(w) for w in work if w.sample):
                self._issue_prefill(rec)
            else:
                self._run_sync(rec, self._eager_prefill, "eager")

    def _run_sync(self, rec: _Record, executor: ModelExecutor, path: str) -> None:
        """A launch the lane's worker runs to completion (host-semantics sampling, or aggregated)."""
        res = executor.run(rec.launch)
        rec.path = path
        rec.done = _HostMark(res.finished_at)
        rec.first = _HostMark(res.started_at)
        rec.step_marks = [(rec.first, rec.done)]  # host-side steps: the launch is one interval
        rec.finish = lambda: res

    @staticmethod
    def _device_sampling_ok(w: ReqWork) -> bool:
        """Whether the graph-safe device sampler gives this row the CPU sampler's token."""
        p = w.params
        if p is None or has_penalty(p) or p.logprobs or w.grammar is not None:  # grammar: host-filled bitmask
            return False
        return not (w.eos_ids and w.output_pos < p.min_new_tokens)

    def _mode(self, params: list) -> str:
        return self._agg._mode(params)

    def _index(self, idx: list[int]) -> torch.Tensor:
        cuda = self.device.type == "cuda"
        host = torch.tensor(idx, dtype=torch.long, pin_memory=cuda)
        return host.to(self.device, non_blocking=cuda)  # pinned + async: no wait on the lane's stream

    def _issue_decode(self, rec: _Record) -> None:
        """k decode steps back to back on the lane's stream; the ids of step j feed step j+1 on the device.

        After each step's replay its ids are copied (non-blocking) into row j of the launch's host buffer
        and the step's end is marked after that copy; the step is then published, so poll() reports its
        tokens as soon as the mark completes, while later steps still run. The launch is done when its
        last step's mark is."""
        launch, runner = rec.launch, self.runner
        work = launch.work
        mode = self._mode([w.params for w in work])
        rec.path = "graph"
        rec.on_device = self.timer.cuda
        buf = rec.buf = self.buffers.acquire(max(w.steps for w in work), len(work))
        starts = []

        def mark_start() -> None:  # right before each step's replay, after its host work
            starts.append(self.timer.mark())

        table = self.table if self.table.prepare(work) else None  # on the lane's stream: only new slots
        steps = graph_decode_steps(runner, work, mode, self.vocab, self._index, before_launch=mark_start,
                                   out_lens=rec.out_lens, table=table)
        for j, (ids, rows) in enumerate(steps):
            buf[j, :len(rows)].copy_(ids, non_blocking=True)  # on the lane's stream, into pinned memory
            self._publish(rec, _Step(j, starts[j], self.timer.mark(), rows))
        rec.step_marks = [(p.start, p.end) for p in rec.parts]
        rec.done = rec.parts[-1].end
        timer = self.timer

        def finish() -> LaunchResult:  # every token went out in the partial parts
            return LaunchResult(launch.launch_id, started_at=timer.host_time(rec.first),
                                finished_at=timer.host_time(rec.done))

        rec.finish = finish

    def _issue_prefill(self, rec: _Record) -> None:
        """An eager forward on the lane's stream, sampled on the device: no host wait."""
        launch = rec.launch
        work = launch.work
        rows = [w for w in work if w.sample]
        params = [w.params for w in rows]
        st, filters = None, False
        # Host->device copies first, while the lane's stream is idle (they would wait for it later).
        if rows and not all(p.is_greedy for p in params):
            st = gpu_sampling.SamplingTensors.build(params, [w.sampling_seed for w in rows],
                                                    [rec.out_lens[w.rid] for w in rows], self.vocab, self.device)
            filters = gpu_sampling.needs_filters(params, self.vocab)
        if self.table.prepare(work):  # on the lane's stream: the chunk's new slots
            fb = self.table.forward_batch([(w.input_ids, w.start_pos, w.table_row, w.sample) for w in work])
        else:
            fb = ForwardBatch.build([(w.input_ids, w.start_pos, w.kv_slots, w.sample) for w in work], self.device)
        self._plan_ahead(self.attn_prefill, fb)
        rec.path = "device"
        rec.on_device = self.timer.cuda
        buf = rec.buf = self.buffers.acquire(1, len(rows)) if rows else None
        rec.first = self.timer.mark()  # after the host work: right before the first kernel
        logits = self.model(fb, self.attn_prefill, self.kv_pool, planned=True)
        if rows:
            ids = (gpu_sampling.greedy(logits, self.vocab) if st is None
                   else gpu_sampling.sample(logits, st, self.vocab, filters=filters))
            buf[0, :len(rows)].copy_(ids, non_blocking=True)  # on the lane's stream, into pinned memory
        rec.done = self.timer.mark()  # after the copy: complete => the ids are in host memory
        rec.step_marks = [(rec.first, rec.done)]
        timer = self.timer

        def finish() -> LaunchResult:
            values = buf[0, :len(rows)].tolist() if rows else []
            res = LaunchResult(launch.launch_id, started_at=timer.host_time(rec.first),
                               finished_at=timer.host_time(rec.done))
            res.tokens = {w.rid: [t] for w, t in zip(rows, values)}
            return res

        rec.finish = finish

    def _plan_ahead(self, attn, fb: ForwardBatch) -> None:
        """The attention plan of `fb` now, host work included (FlashInfer's is otherwise deferred to the
        first layer, i.e. after the caller's first-kernel mark); the forward then runs with planned=True."""
        attn.plan(fb)
        plan_now = getattr(attn, "plan_now", None)  # only FlashInfer defers its plan
        if plan_now is not None:
            plan_now(self._q_dtype, self.kv_pool.dtype)

    # ---- scheduler side -----------------------------------------------------------------------------------
    def _collect(self) -> list[LaunchResult]:
        """The parts that became visible since the last call: per completed decode step a partial result,
        per finished launch its final part; token times are the host time they were seen here."""
        for buf in self._release:  # final parts returned by the previous call have been applied since
            self.buffers.release(buf)
        self._release.clear()
        # A failed launch is reported before anything else finishes, so no result is dropped.
        for lid, rec in list(self._inflight.items()):
            if rec.issued and rec.error is not None:
                with self._cv:
                    self._inflight.pop(lid, None)
                raise RuntimeError(f"{rec.launch.lane.value} lane: launch {lid} failed: {rec.error!r}") from rec.error
        out = []
        for lid, rec in list(self._inflight.items()):
            with self._cv:
                issued = rec.issued and rec.error is None  # a failure is raised by the next call
                parts = rec.parts[rec.sent:]
            done = issued and rec.done.query()
            for step in parts:  # in order; all of them once the launch is done
                if not done and not step.end.query():
                    break
                out.append(self._partial(rec, step))
            if not done:
                continue
            res = rec.finish()
            seen = self.clock()
            if res.tokens:  # a one-part launch: its tokens became visible now
                res.token_times = {rid: [seen] * len(toks) for rid, toks in res.tokens.items()}
                if rec.path == "device":  # (the host-side paths log their own deliveries)
                    self.deliveries.append(Delivery(rec.launch.lane.value, lid, 0, len(res.tokens),
                                                    self.timer.host_time(rec.done), seen))
            with self._cv:
                self._inflight.pop(lid, None)
            if rec.buf is not None:
                self._release.append(rec.buf)
            self.stats.paths[rec.path] = self.stats.paths.get(rec.path, 0) + 1
            rec.steps = [(self.timer.host_time(a), self.timer.host_time(b)) for a, b in rec.step_marks]
            self.intervals.extend((rec.launch.lane, lid, a, b) for a, b in rec.steps)
            out.append(res)
        return out

    def _partial(self, rec: _Record, step: _Step) -> LaunchResult:
        """One completed decode step's tokens, read from the host buffer (its copy is complete: no sync)."""
        values = rec.buf[step.index, :len(step.rows)].tolist()
        seen = self.clock()
        lid = rec.launch.launch_id
        res = LaunchResult(lid, started_at=self.timer.host_time(rec.first), finished_at=seen, final=False)
        res.tokens = {w.rid: [v] for w, v in zip(step.rows, values)}
        res.token_times = {w.rid: [seen] for w in step.rows}
        self.deliveries.append(Delivery(rec.launch.lane.value, lid, step.index, len(step.rows),
                                        self.timer.host_time(step.end), seen))
        rec.sent += 1
        return res


def lane_overlap_s(intervals, a: LaneKind = LaneKind.PREFILL, b: LaneKind = LaneKind.DECODE) -> float:
    """Total time during which a step of lane `a` and one of lane `b` ran at once (the steps of one lane
    never overlap each other: they run in order on its stream)."""
    xs = [(s, e) for lane, _, s, e in intervals if lane == a]
    ys = [(s, e) for lane, _, s, e in intervals if lane == b]
    return sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in xs for s2, e2 in ys)


def _indexed(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _attn_factory(attn, model, device):
    """A second instance of the same attention backend (plan state is per instance)."""
    def make():
        from sglang_duet.kernels.attention import get_attention_backend

        return get_attention_backend(getattr(attn, "name", "torch"), model.config, device)

    return make


# ---- factory ---------------------------------------------------------------------------------------------

def resolve_lanes(value, device: torch.device | str, policy: str | None) -> int:
    """--lanes auto|1|2: auto gives two lanes on a CUDA device for a policy that can split."""
    v = "auto" if value in (None, "") else str(value)
    if v in ("1", "2"):
        return int(v)
    if v != "auto":
        raise ValueError(f"--lanes must be auto, 1 or 2, got {value!r}")
    can_split = (policy or "aggregated") not in SINGLE_LANE_POLICIES
    return 2 if torch.device(device).type == "cuda" and can_split else 1


def _arg(args, name: str, default=None):
    if args is None:
        return default
    got = getattr(args, name, None)
    if got is None:
        got = (getattr(args, "extra", None) or {}).get(name)
    return default if got is None else got


def build_executor(model, kv_pool, attn_backend, device, args=None, clock=time.monotonic):
    """The engine's executor factory: DuetGPUExecutor when --lanes resolves to 2, and on a GPU also for
    one lane (its worker thread runs launches while the scheduler plans the next: overlap scheduling;
    no partition graphs are captured then); else the synchronous `build_model_executor`
    (ModelExecutor on a CPU; GPUModelExecutor on a GPU with --disable-overlap-schedule)."""
    lanes = resolve_lanes(_arg(args, "lanes", "auto"), device, _arg(args, "policy", "aggregated"))
    if lanes == 1:
        if torch.device(device).type != "cuda" or _arg(args, "disable_overlap_schedule", False):
            return build_model_executor(model, kv_pool, attn_backend, torch.device(device), args, clock=clock)
        return build_duet_executor(model, kv_pool, attn_backend, device, args, clock=clock, capture_sms=[])
    return build_duet_executor(model, kv_pool, attn_backend, device, args, clock=clock)


def build_duet_executor(model, kv_pool, attn_backend, device, args=None, clock=time.monotonic,
                        partitioner: SMPartitioner | None = None, make_attn=None,
                        capture_sms=None) -> DuetGPUExecutor:
    """DuetGPUExecutor with a partitioner for this device (args.sm_partition_backend: auto|cuda|torch|none;
    grid from args.hardware) and a partitioned decode runner: CUDA graphs on a GPU, the same static-buffer
    path run eagerly on a CPU. The all-SM greedy buckets are captured now, and so are the splits of the
    decode sizes in args.duet_capture_sms (a list of SM counts; None: the whole grid) with their greedy
    graphs (`_prepare`); another size is split and captured lazily at its first use."""
    device = torch.device(device)
    if partitioner is None:
        hw = None
        try:
            from sglang_duet.cost_model.hardware import HardwareSpec

            hw = HardwareSpec.load(_arg(args, "hardware", "h100"))
        except Exception as e:  # noqa: BLE001 - the grid then uses Hopper's defaults
            logger.warning("no hardware spec for the SM grid (%s): granularity 8, minimum 8", e)
        partitioner = SMPartitioner.for_device(device, hw, _arg(args, "sm_partition_backend", "auto"))
    runner = None
    max_bs = _arg(args, "cuda_graph_max_bs", None) or DEFAULT_MAX_BS
    max_kv = min(kv_pool.num_slots, max_bs * model.config.max_position_embeddings) + max_bs
    if device.type != "cuda":
        runner = PartitionedDecodeRunner(model, attn_backend, kv_pool, max_bs=max_bs, use_graphs=False,
                                         max_kv_tokens=max_kv)
    elif not _arg(args, "disable_cuda_graph", False) and supports_graphs(attn_backend):
        start = time.perf_counter()
        runner = PartitionedDecodeRunner(model, attn_backend, kv_pool, max_bs=max_bs, max_kv_tokens=max_kv)
        runner.capture(("greedy",))
        logger.info("captured %d all-SM decode graphs in %.1f s; partition graphs are captured on first use",
                    len(runner.sizes), time.perf_counter() - start)
    ex = DuetGPUExecutor(model, kv_pool, attn_backend, device, partitioner, clock=clock, graph_runner=runner,
                         make_attn=make_attn, req_to_token=ReqToTokenTable.for_executor(kv_pool, model.config, args,
                                                                                        _indexed(device)))
    logger.info("two-lane executor: SM partitions via %s (%d SMs, grid %s)", partitioner.backend,
                partitioner.total, partitioner.grid())
    _prepare(ex, capture_sms if capture_sms is not None else _arg(args, "duet_capture_sms", None))
    return ex


def _prepare(ex: DuetGPUExecutor, sizes) -> None:
    """Splits and decode graphs of these decode sizes now: captured lazily, they would stall the decode
    lane inside a measured run. A size that fails is logged and left to the lazy path."""
    sms = ex.partitioner.grid() if sizes is None else _sm_list(sizes)
    start = time.perf_counter()
    for s in sms:
        try:
            ex.prepare([s])
        except Exception:  # noqa: BLE001 - an optimisation: the first use of that split tries again
            logger.warning("preparing the %s-SM decode split failed; it is created at first use", s, exc_info=True)
    graphs = sum(len(m) for k, b in (ex.runner.captured() if ex.runner else {}).items() if k is not None
                 for m in b.values())
    logger.info("prepared decode splits %s in %.1f s (%d partition graphs)", sms, time.perf_counter() - start, graphs)


def _sm_list(value) -> list[int]:
    """duet_capture_sms as a list of ints (also "16,32" from a config string, or one int)."""
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    elif isinstance(value, int):
        value = [value]
    return [int(v) for v in value]

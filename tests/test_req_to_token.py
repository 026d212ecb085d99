"""The device-side request-to-token table (sglang_duet/memory/req_to_token.py), on the CPU.

* Through the scheduler core (fake lanes that read and write KV through the table's rows instead
  of the core's slot lists): growing k-step decodes, chunked prefills, retraction with row reuse,
  overlapped launches with future inputs. The outputs must be the reference tokens, every row must
  equal its request's kv_slots, and a decode launch copies exactly its new slots.
* Step inputs gathered from the table equal ForwardBatch.build's (the oracle) for random batches.
* Host work: the slot ints a decode step touches in Python are O(batch), counted, not timed.
* The real executors (tiny llama): the table path gives the slot-list path's tokens, and never
  falls back for work from the core.
"""
from __future__ import annotations

import dataclasses
import random

import msgspec
import pytest
import torch

from sglang_duet.core.plan import LaneBatch, LaneKind, Launch, ReqWork
from sglang_duet.core.scheduler_core import CoreConfig, SchedulerCore
from sglang_duet.executor.gpu_executor import GPUModelExecutor, graph_decode_steps
from sglang_duet.executor.model_executor import ModelExecutor
from sglang_duet.kernels.attention.base import ForwardBatch
from sglang_duet.kernels.attention.torch_backend import TorchAttentionBackend
from sglang_duet.kernels.cuda_graph import CudaGraphDecodeRunner
from sglang_duet.memory.kv_pool import KVCachePool
from sglang_duet.memory.req_to_token import ReqToTokenTable, table_rows_for
from sglang_duet.model_loader.loader import load_model
from sglang_duet.policies.base import PolicyContext, load_policy
from sglang_duet.sampling_params import SamplingParams
from fake_lanes import FakeLanes, SplitAlways, reference_tokens
from test_scheduler_core import outputs, prompt

FIELDS = ("input_ids", "positions", "out_cache_loc", "qo_indptr", "kv_indptr", "kv_indices", "seq_lens",
          "prefix_lens", "sample_indices")


def assert_same_batch(got: ForwardBatch, ref: ForwardBatch) -> None:
    for f in FIELDS:
        a, b = getattr(got, f), getattr(ref, f)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f
    assert (got.seq_lens_cpu, got.prefix_lens_cpu, got.extend_lens_cpu) == \
        (ref.seq_lens_cpu, ref.prefix_lens_cpu, ref.extend_lens_cpu)


# ---- through the core ------------------------------------------------------------------------------

class TableLanes(FakeLanes):
    """Fake lanes whose launches see KV only through the table: each launch syncs it (in submission
    order, which is each lane's run order), checks every row against its request's slot list, then
    runs on copies of the work whose slot lists are read back from the table."""

    def __init__(self, core, pool_size: int, **kw):
        super().__init__(core, pool_size, **kw)
        self.table = ReqToTokenTable(core.config.table_rows, core.config.context_length + 8)
        self.decode_copies: list[tuple[int, int]] = []  # (copied, expected) of decode launches on known rows
        self.row_owners: dict[int, set[str]] = {}

    def submit(self, launch: Launch) -> None:
        t = self.table
        known = all(t.owner(w.table_row) is w.kv_slots for w in launch.work)
        assert t.prepare(launch.work), "work from the core must fit the table"
        if known and not launch.batch.prefill:  # a decode launch on rows already synced: only its new slots
            self.decode_copies.append((t.stats.last_copied, sum(w.steps for w in launch.work)))
        shadow = []
        for w in launch.work:
            need = w.start_pos + len(w.input_ids) + w.steps - 1
            row = t.row_slots(w.table_row)
            assert row[:need] == w.kv_slots[:need], f"{w.rid}: row {w.table_row} differs from kv_slots"
            self.row_owners.setdefault(w.table_row, set()).add(w.rid)
            shadow.append(msgspec.structs.replace(w, kv_slots=row[:need]))
        super().submit(dataclasses.replace(launch, work=shadow))


def _drive(policy, pool=4096, max_running=256, overlap=False, budget=32, n=8, new=12, plen=lambda i: 5 + 7 * i):
    box = {}
    core = SchedulerCore(CoreConfig(kv_slots=pool, context_length=512, max_running_requests=max_running,
                                    chunked_prefill_size=budget, overlap=overlap),
                         policy if not isinstance(policy, str)
                         else load_policy(policy, PolicyContext(chunked_prefill_size=budget)),
                         clock=lambda: box["lanes"].clock())
    lanes = box["lanes"] = TableLanes(core, pool)
    for i in range(n):
        core.add_request(f"r{i}", prompt(i, plen(i)), SamplingParams(max_new_tokens=new))
    out, _ = outputs(lanes.run())
    assert out == {f"r{i}": reference_tokens(prompt(i, plen(i)), new) for i in range(n)}
    return core, lanes


def test_table_follows_k_step_decodes_and_chunked_prefills():
    core, lanes = _drive(SplitAlways(prefill_budget=16, steps=3))
    assert any(len(lnch.work) > 1 and lnch.batch.steps == 3 for lnch in lanes.launches)
    assert any(c.start > 0 for lnch in lanes.launches for c in lnch.batch.prefill), "no chunked prefill"
    # a decode launch on rows already on the device copies exactly batch x steps slots
    assert lanes.decode_copies and all(got == want for got, want in lanes.decode_copies)


def test_table_rows_are_rewritten_after_retraction_and_reuse():
    core, lanes = _drive("aggregated", pool=60, max_running=4, n=7, new=14, plen=lambda i: 6 + i)
    assert core.stats.retractions > 0
    assert any(len(owners) > 1 for owners in lanes.row_owners.values()), "no row was reused by another request"
    # every admission (the first, and each after a retraction) rewrote its row from 0, nothing else did
    assert lanes.table.stats.rewrites == 7 + core.stats.retractions
    assert lanes.decode_copies and all(got == want for got, want in lanes.decode_copies)


@pytest.mark.parametrize("policy", ["aggregated", "chunked"])
def test_table_with_overlapped_launches_and_future_inputs(policy):
    core, lanes = _drive(policy, overlap=True, budget=24, n=6)
    assert lanes.queued_submits > 0, "no launch was planned behind a running one"
    assert lanes.decode_copies and all(got == want for got, want in lanes.decode_copies)


def test_sync_copies_only_new_slots_and_rewrites_changed_rows():
    t = ReqToTokenTable(4, 64)
    slots = list(range(100, 120))
    w = ReqWork("a", [1] * 10, 0, slots, False, table_row=2)
    assert t.sync([w]) == 10 and t.row_slots(2) == slots[:10]
    w = ReqWork("a", [1] * 6, 10, slots, True, table_row=2)  # the next chunk
    assert t.sync([w]) == 6
    w = ReqWork("a", [7], 16, slots, True, steps=3, table_row=2)  # a 3-step decode: its 3 slots
    assert t.sync([w]) == 3 and t.row_slots(2) == slots[:19]
    assert t.sync([w]) == 0  # nothing new
    assert t.stats.rewrites == 1
    # retraction: the core frees the KV and gives the request a new list; same row, same rid
    again = list(range(300, 330))
    assert t.sync([ReqWork("a", [1] * 25, 0, again, True, table_row=2)]) == 25
    assert t.row_slots(2) == again[:25] and t.stats.rewrites == 2
    # another request on the row
    other = [5, 6, 7]
    assert t.sync([ReqWork("b", [1, 2, 3], 0, other, True, table_row=2)]) == 3 and t.row_slots(2) == other
    # a list that shrank under the row (mutated in place): rewritten from 0
    del other[1:]
    other.append(9)
    assert t.sync([ReqWork("b", [1], 1, other, True, table_row=2)]) == 2 and t.row_slots(2) == [5, 9]
    with pytest.raises(ValueError, match="needs 5"):
        t.sync([ReqWork("c", [1] * 5, 0, [1, 2], True, table_row=1)])


def test_prepare_falls_back_for_work_the_table_cannot_hold():
    t = ReqToTokenTable(4, 16)
    assert not t.prepare([ReqWork("a", [1], 0, [3], True)])  # built by hand: no row
    assert not t.prepare([ReqWork("a", [1], 0, [3], True, table_row=4)])  # beyond the rows
    assert not t.prepare([ReqWork("a", [1] * 17, 0, list(range(1, 18)), True, table_row=0)])  # beyond the columns
    assert not t.prepare([ReqWork("a", [1], 15, list(range(1, 18)), True, steps=2, table_row=0)])  # look-ahead too
    assert t.stats.fallbacks == 4 and t.stats.slots_copied == 0
    assert t.prepare([ReqWork("a", [1] * 16, 0, list(range(1, 17)), True, table_row=3)])


def test_sizing_follows_the_core_config():
    assert table_rows_for(None) == CoreConfig(kv_slots=10, context_length=10).table_rows
    assert table_rows_for(7) == CoreConfig(kv_slots=10, context_length=10, max_running_requests=7).table_rows

    class Cfg:
        max_position_embeddings = 2048

    class Args:
        max_running_requests = 5
        context_length = 300
        extra = {}

    pool = KVCachePool(1, 100_000, 1, 4)
    t = ReqToTokenTable.for_executor(pool, Cfg(), Args())
    assert (t.rows, t.cols) == (12, 300 + 64)
    t = ReqToTokenTable.for_executor(pool, Cfg())
    assert (t.rows, t.cols) == (514, 2048 + 64)
    assert ReqToTokenTable.for_executor(KVCachePool(1, 500, 1, 4), Cfg()).cols == 500  # never past the pool


# ---- inputs from the table == ForwardBatch.build ----------------------------------------------------

def _random_batch(rng: random.Random, rows: int, cols: int, decode_only: bool):
    """[(ReqWork, slots)]: distinct rows, random lengths, prefixes and chunk sizes, scattered slots."""
    b = rng.randint(1, min(rows, 12))
    work = []
    for row in rng.sample(range(rows), b):
        end = rng.randint(1, cols)
        n = 1 if decode_only else rng.randint(1, end)
        slots = rng.sample(range(1, 50_000), end)
        work.append(ReqWork(f"q{row}", [rng.randrange(1000) for _ in range(n)], end - n, slots,
                            rng.random() < 0.7, table_row=row))
    return work


def _check_random_batch(seed: int, decode_only: bool) -> None:
    rng = random.Random(seed)
    rows, cols = rng.randint(1, 20), rng.randint(1, 90)
    t = ReqToTokenTable(rows, cols)
    for _ in range(3):  # the same table through several launches: rows grow, change owner, shrink
        work = _random_batch(rng, rows, cols, decode_only)
        for w in work:  # part of each row may already be on the device from an earlier launch
            if rng.random() < 0.5 and w.start_pos > 0:
                t.sync([msgspec.structs.replace(w, input_ids=[0] * rng.randint(1, w.start_pos), start_pos=0)])
        assert t.prepare(work)
        entries = [(w.input_ids, w.start_pos, w.table_row, w.sample) for w in work]
        assert_same_batch(t.forward_batch(entries),
                          ForwardBatch.build([(w.input_ids, w.start_pos, w.kv_slots, w.sample) for w in work]))
        for w in work:
            assert t.row_slots(w.table_row) == w.kv_slots[:w.start_pos + len(w.input_ids)]


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=150, deadline=None)
    @given(seed=st.integers(0, 2**32 - 1), decode_only=st.booleans())
    def test_inputs_from_the_table_equal_forward_batch_build(seed, decode_only):
        _check_random_batch(seed, decode_only)
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    @pytest.mark.parametrize("seed", range(150))
    def test_inputs_from_the_table_equal_forward_batch_build(seed):
        _check_random_batch(seed, seed % 2 == 0)


def test_decode_gather_into_static_buffers_equals_the_slot_lists():
    rng = random.Random(5)
    t = ReqToTokenTable(10, 200)
    work = _random_batch(rng, 10, 200, decode_only=True)
    t.prepare(work)
    n = len(work)
    seq = [w.start_pos + 1 for w in work]
    total = sum(seq)
    out_loc = torch.full((n + 2,), -1, dtype=torch.long)
    kv = torch.full((total + 5,), -1, dtype=torch.long)
    indptr = torch.tensor([0] + [sum(seq[:i + 1]) for i in range(n)], dtype=torch.int32)
    t.gather_decode(torch.tensor([w.table_row for w in work]), torch.tensor([w.start_pos for w in work]),
                    torch.tensor(seq, dtype=torch.int32), indptr, total, out_loc[:n], kv)
    assert out_loc[:n].tolist() == [w.kv_slots[w.start_pos] for w in work] and out_loc[n:].tolist() == [-1, -1]
    assert kv[:total].tolist() == [s for w, L in zip(work, seq) for s in w.kv_slots[:L]]
    assert kv[total:].tolist() == [-1] * 5  # nothing written past the batch's indices


# ---- host work: slot ints touched per decode step -----------------------------------------------------

class CountingList(list):
    """A slot list that counts the elements Python code reads from it (slices and items)."""

    reads = 0

    def __getitem__(self, i):
        got = super().__getitem__(i)
        CountingList.reads += len(got) if isinstance(i, slice) else 1
        return got

    def __iter__(self):
        CountingList.reads += len(self)
        return super().__iter__()


@pytest.fixture(scope="module")
def model(tiny_model_factory):
    torch.manual_seed(0)
    return load_model(tiny_model_factory("llama"), dtype="float32", device="cpu").model


def _pool(model, slots):
    c = model.config
    return KVCachePool(c.num_hidden_layers, slots, c.num_key_value_heads, c.head_dim, torch.float32, "cpu")


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-runner"])
def test_a_decode_step_touches_batch_slots_not_batch_x_context(model, graphs):
    """B rows of context C: after the prefill, a decode launch of k steps reads B x k slot ints from the
    slot lists (the new ones) with the table, B x C x k without it."""
    B, C, k = 6, 150, 2
    pool = _pool(model, B * (C + k) + 8)
    lists = [CountingList(range(1 + i * (C + k), 1 + (i + 1) * (C + k))) for i in range(B)]

    def make(table_rows: bool):
        runner = CudaGraphDecodeRunner(model, TorchAttentionBackend(), pool, max_bs=8, use_graphs=False)
        ex = (GPUModelExecutor(model, pool, runner.attn, torch.device("cpu"), graph_runner=runner) if graphs
              else ModelExecutor(model, pool, TorchAttentionBackend(), torch.device("cpu")))

        def work(start, n, steps, sample):
            return [ReqWork(f"r{i}", [7 + i] * n, start, s, sample, steps, params=SamplingParams(temperature=0.0),
                            table_row=(3 * i if table_rows else None)) for i, s in enumerate(lists)]
        return ex, work

    counts = {}
    for table_rows in (True, False):
        ex, work = make(table_rows)
        ex.submit(Launch(0, LaneKind.AGGREGATED, LaneBatch(), work(0, C, 1, True)))  # prefill: C slots each
        ex.poll()
        CountingList.reads = 0
        copied = ex.table.stats.slots_copied
        ex.submit(Launch(1, LaneKind.AGGREGATED, LaneBatch(decode=[f"r{i}" for i in range(B)], steps=k),
                         work(C, 1, k, True)))
        (res,) = ex.poll()
        assert all(len(v) == k for v in res.tokens.values())
        counts[table_rows] = (CountingList.reads, ex.table.stats.slots_copied - copied, res.tokens)
    reads, copied, toks = counts[True]
    assert copied == B * k and reads == B * k  # the launch's new slots, once
    assert counts[False][0] >= B * C * k  # the slot-list path flattens every row every step
    assert toks == counts[False][2]


# ---- real executors through the core: table path == slot-list path ------------------------------------

def _serve(model, make_executor, table_on: bool, monkeypatch):
    pool_slots = 90  # tight: retractions, row reuse
    pool = _pool(model, pool_slots)
    ex = make_executor(pool)
    if not table_on:
        monkeypatch.setattr(ex.table, "prepare", lambda work: False)
    else:
        def no_lists(*a, **kw):
            raise AssertionError("ForwardBatch.build called for work with table rows")
        monkeypatch.setattr(ForwardBatch, "build", no_lists)
    core = SchedulerCore(CoreConfig(kv_slots=pool_slots, context_length=256, max_running_requests=4,
                                    chunked_prefill_size=16),
                         load_policy("chunked", PolicyContext(chunked_prefill_size=16)))
    lens = [(5, 14), (23, 10), (40, 12), (9, 11), (31, 9), (17, 13)]
    out: dict[str, list[int]] = {}
    for i, (n, new) in enumerate(lens):
        core.add_request(f"r{i}", [(i * 37 + j * 11) % 300 + 3 for j in range(n)],
                         SamplingParams(max_new_tokens=new, temperature=0.0 if i % 2 else 0.8, seed=i), seed=100 + i)
    try:
        for _ in range(10_000):
            if not core.has_unfinished():
                break
            for launch in core.schedule():
                ex.submit(launch)
            for res in ex.poll(timeout=10.0):
                for u in core.apply_result(res):
                    out.setdefault(u.rid, []).extend(u.new_token_ids)
        assert not core.has_unfinished()
    finally:
        monkeypatch.undo()
        getattr(ex, "shutdown", lambda: None)()
    return out, core, ex


@pytest.mark.parametrize("kind", ["model", "graph"])
def test_executor_tokens_with_the_table_equal_the_slot_list_path(model, kind, monkeypatch):
    def make(pool):
        if kind == "model":
            return ModelExecutor(model, pool, TorchAttentionBackend(), torch.device("cpu"))
        runner = CudaGraphDecodeRunner(model, TorchAttentionBackend(), pool, max_bs=8, use_graphs=False)
        return GPUModelExecutor(model, pool, runner.attn, torch.device("cpu"), graph_runner=runner)

    ref, _, ex_ref = _serve(model, make, False, monkeypatch)
    got, core, ex = _serve(model, make, True, monkeypatch)
    assert got == ref and len(got) == 6
    assert core.stats.retractions > 0
    assert ex.table.stats.fallbacks == 0 and ex.table.stats.slots_copied > 0
    assert ex_ref.table.stats.slots_copied == 0


def test_graph_decode_steps_from_the_table_equal_the_lists(model):
    """graph_decode_steps with the table (device gathers into the static buffers) vs the flattened lists:
    the same ids each step, rows dropping out included."""
    prompts = [[5, 9, 11, 2], [7] * 9, [3, 4, 8]]
    steps = (4, 2, 3)
    slot_lists = [list(range(1 + 30 * i, 1 + 30 * i + len(p) + k)) for i, (p, k) in enumerate(zip(prompts, steps))]
    outs = []
    for use_table in (False, True):
        pool = _pool(model, 128)
        fb = ForwardBatch.build([(p[:-1], 0, s, False) for p, s in zip(prompts, slot_lists)])
        model(fb, TorchAttentionBackend(), pool)
        runner = CudaGraphDecodeRunner(model, TorchAttentionBackend(), pool, max_bs=4, use_graphs=False)
        work = [ReqWork(f"r{i}", [p[-1]], len(p) - 1, s, True, steps=k, params=SamplingParams(temperature=0.0),
                        table_row=(5 - i if use_table else None))
                for i, (p, s, k) in enumerate(zip(prompts, slot_lists, steps))]
        table = ReqToTokenTable(6, 32)
        assert table.prepare(work) == use_table
        got = [(ids.tolist(), [w.rid for w in rows])
               for ids, rows in graph_decode_steps(runner, work, "greedy", model.config.vocab_size, torch.tensor,
                                                   table=table if use_table else None)]
        outs.append((got, runner.kv_indices[:40].clone(), runner.out_cache_loc.clone()))
    assert outs[0][0] == outs[1][0]
    assert torch.equal(outs[0][1], outs[1][1]) and torch.equal(outs[0][2], outs[1][2])


def test_two_lane_executor_with_overlap_uses_the_table(model):
    """The overlap scenario of test_overlap_executor (futures, history lagging behind) on the two-lane
    executor: the synchronous executor's tokens, every launch served from the table."""
    import test_overlap_executor as ov
    from test_duet_executor import duet

    made = []

    def make(pool):
        made.append(duet(model)(pool))
        return made[-1]

    ref, _ = ov.run(model, lambda pool: ModelExecutor(model, pool, TorchAttentionBackend(), torch.device("cpu")),
                    overlap=False)
    got, futures = ov.run(model, make, overlap=True)
    assert futures > 0 and got == ref
    stats = made[0].table.stats
    assert stats.fallbacks == 0 and stats.slots_copied > 0


def test_input_prep_benchmark_smoke(tmp_path):
    import json

    from benchmark.input_prep import main

    out = tmp_path / "prep.json"
    main(["--batches", "3", "--contexts", "20", "--steps", "2", "--repeats", "1", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert {"eager-lists", "eager-table", "graph-lists", "graph-table"} <= row.keys()

"""KV between hosts through the Mooncake transfer engine, and the transport `auto` builds with it.

Two Mooncake engines on loopback (TCP, P2PHANDSHAKE) move a KV export byte-exact, in one process
and across processes; the host-aware transport reads through shm from a prefill on this machine
and through Mooncake from one whose machine id differs. Skipped where the engine cannot load
(`apt-get install -y libibverbs1 && pip install mooncake-transfer-engine-non-cuda==0.3.13.post1`).
"""
from __future__ import annotations

import multiprocessing as mp
import random

import msgspec
import pytest
import torch

from sglang_duet.disagg.host_aware import HostAwareTransport, machine_id
from sglang_duet.disagg.kv_transport import gather_slots, pool_layout, slot_runs
from sglang_duet.disagg.messages import KVDescriptor
from sglang_duet.disagg.mooncake import MooncakeTransport, mooncake_error, plan_reads
from sglang_duet.disagg.transfer import ShmTransport, make_transport
from sglang_duet.memory.kv_pool import KVCachePool

pytestmark = pytest.mark.timeout(120)
needs_mooncake = pytest.mark.skipif(mooncake_error() is not None, reason=str(mooncake_error()))


def _pool(slots=64, layers=3, heads=2, dim=8, dtype=torch.float32):
    return KVCachePool(layers, slots, heads, dim, dtype, "cpu")


def _fragmented(n_slots: int, k: int, seed: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    return rng.sample(range(1, n_slots), k), rng.sample(range(1, n_slots), k)


def test_plan_reads_moves_what_the_gather_moves():
    # pools of different sizes: the plane strides differ on the two sides
    src, dst, ref = _pool(slots=64), _pool(slots=40), _pool(slots=40)
    src.buffer.copy_(torch.randn_like(src.buffer))
    src_slots, dst_slots = _fragmented(40, 20, 1)
    src_slots = [s + 20 for s in src_slots]
    gather_slots(src.buffer, src_slots, ref, dst_slots)
    s_bytes = src.buffer.view(-1).view(torch.uint8)
    d_bytes = dst.buffer.view(-1).view(torch.uint8)
    reads = plan_reads(list(src.buffer.shape), src_slots, list(dst.buffer.shape), dst_slots, 4)
    assert len(reads) == 2 * 3 * len(slot_runs(src_slots, dst_slots))
    for so, do, n in reads:
        d_bytes[do:do + n] = s_bytes[so:so + n]
    assert torch.equal(dst.buffer, ref.buffer)


@needs_mooncake
def test_mooncake_round_trip_on_loopback(caplog):
    src, dst = _pool(), _pool(slots=80)
    tx = MooncakeTransport(src, pool_layout(src), "p0", "127.0.0.1")
    rx = MooncakeTransport(dst, pool_layout(dst), "d0", "127.0.0.1")
    try:
        src.buffer.copy_(torch.randn_like(src.buffer))
        for i, (s, d) in enumerate([(list(range(3, 30)), list(range(40, 67))), _fragmented(64, 40, 2)]):
            desc = tx.export(f"t{i}", s)
            wire = msgspec.json.decode(msgspec.json.encode(desc), type=KVDescriptor)  # as it travels
            stats = rx.import_kv(wire, d)
            assert stats.backend == "mooncake" and stats.nbytes == len(s) * pool_layout(src).bytes_per_token
            assert torch.equal(dst.buffer[:, :, d], src.buffer[:, :, s])
        # a descriptor pointing outside the registered pool is refused by the prefill's engine
        bad = msgspec.structs.replace(tx.export("bad", [1]), handle={**desc.handle, "base": desc.handle["base"] << 4})
        with pytest.raises(RuntimeError, match="Mooncake read"):
            rx.import_kv(bad, [5])
    finally:
        tx.close()
        rx.close()


def _export_in_child(conn):
    src = _pool()
    src.buffer.copy_(torch.arange(src.buffer.numel(), dtype=torch.float32).view_as(src.buffer))
    tx = MooncakeTransport(src, pool_layout(src), "p1", "127.0.0.1")
    conn.send_bytes(msgspec.msgpack.encode(tx.export("x", [7, 8, 9, 50, 2])))
    conn.recv()  # keep the pool alive until the parent has read it
    tx.close()


@needs_mooncake
def test_mooncake_across_processes():
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_export_in_child, args=(child,))
    p.start()
    try:
        assert parent.poll(60), "the prefill child did not export"
        desc = msgspec.msgpack.decode(parent.recv_bytes(), type=KVDescriptor)
        dst = _pool()
        rx = MooncakeTransport(dst, pool_layout(dst), "d1", "127.0.0.1")
        dst_slots = [1, 2, 3, 4, 5]
        rx.import_kv(desc, dst_slots)
        expect = torch.arange(dst.buffer.numel(), dtype=torch.float32).view_as(dst.buffer)[:, :, [7, 8, 9, 50, 2]]
        assert torch.equal(dst.buffer[:, :, dst_slots], expect)
        rx.close()
    finally:
        parent.send(None)
        p.join(20)
    assert p.exitcode == 0


@needs_mooncake
def test_auto_reads_through_shm_on_this_host_and_mooncake_from_another(tmp_path):
    src, dst = _pool(), _pool()
    tx = make_transport("auto", src, pool_layout(src), "p2", "prefill", shm_dir=str(tmp_path))
    rx = make_transport("auto", dst, pool_layout(dst), "d2", "decode", shm_dir=str(tmp_path))
    assert isinstance(tx, HostAwareTransport) and tx.name == rx.name == "shm+mooncake"
    try:
        src.buffer.copy_(torch.randn_like(src.buffer))  # the pool lives in shared memory now, registered there
        s, d = [4, 5, 6, 30], [10, 11, 12, 13]
        desc = tx.export("a", s)
        assert desc.handle["host"] == machine_id()
        assert rx.import_kv(desc, d).backend == "shm"
        assert torch.equal(dst.buffer[:, :, d], src.buffer[:, :, s])
        dst.buffer.zero_()
        elsewhere = msgspec.structs.replace(desc, handle={**desc.handle, "host": "another-machine/boot"})
        assert rx.import_kv(elsewhere, d).backend == "mooncake"
        assert torch.equal(dst.buffer[:, :, d], src.buffer[:, :, s])
    finally:
        tx.close()
        rx.close()


def test_explicit_backends_refuse_what_they_cannot_do():
    if mooncake_error() is None:
        pool = _pool()
        assert isinstance(make_transport("shm", pool, pool_layout(pool), "x", "decode"), ShmTransport)
    else:
        pool = _pool()
        with pytest.raises(RuntimeError, match="libibverbs1"):
            make_transport("mooncake", pool, pool_layout(pool), "x", "decode")
    with pytest.raises(ValueError, match="mooncake"):
        make_transport("nccl", _pool(), pool_layout(_pool()), "x", "decode")


def test_kv_transfer_benchmark_smoke():
    from sglang_duet.benchmark import kv_transfer as bench  # importable by name: its prefill child is spawned
    backends = ["shm"] + ([] if mooncake_error() else ["mooncake"])
    res = bench.run(backends, tokens=8, repeats=2, fragmented=True)
    assert sorted(res) == sorted(backends)
    for r in res.values():  # each import was checked against the exporter's hash
        assert r["byte_exact"] and r["bytes"] == 8 * 147456 and len(r["times_s"]) == 2

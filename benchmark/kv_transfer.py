"""Bytes per second of one prompt's KV moved prefill -> decode, per transport, between two processes.

    python benchmark/kv_transfer.py                                  # Qwen3-8B-shaped KV, 4096 tokens
    python benchmark/kv_transfer.py --tokens 1024 --backends shm mooncake --out benchmark/results/kv_transfer-cpu2

A child process plays the prefill instance: a KV pool of Qwen3-8B's shape (36 layers, 8 KV heads,
head dim 128, bfloat16: 147 KB per token), filled with random bytes and exported once per backend
(shm: the pool moved into /dev/shm; mooncake: the pool registered with a Mooncake transfer engine,
TCP, P2PHANDSHAKE on 127.0.0.1). This process plays the decode instance and imports the prompt's
slots into its own pool with `KVTransport.import_kv`, as the decode scheduler does, --repeats
times; the first import of each backend is checked byte for byte (a hash of the slots on both
sides). Slots are contiguous (a fresh allocator hands out runs) unless --fragmented.

Reported: median and best seconds per transfer, GB/s (1e9 bytes/s) of the median.

Two network namespaces joined by a veth pair put a real (virtual) link between the two engines
instead of loopback (root; the script enters namespaces that already exist):

    ip netns add kvA && ip netns add kvB && ip link add vethA type veth peer name vethB
    ip link set vethA netns kvA && ip link set vethB netns kvB
    ip -n kvA addr add 10.77.0.1/24 dev vethA && ip -n kvB addr add 10.77.0.2/24 dev vethB
    ip -n kvA link set vethA up && ip -n kvB link set vethB up
    python benchmark/kv_transfer.py --backends mooncake --prefill-netns kvA --prefill-host 10.77.0.1 \
        --decode-netns kvB --decode-host 10.77.0.2
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(_REPO))

from sglang_duet.disagg.kv_transport import pool_layout  # noqa: E402
from sglang_duet.memory.kv_pool import KVCachePool  # noqa: E402

QWEN3_8B = {"layers": 36, "kv_heads": 8, "head_dim": 128}


def _pool(tokens: int) -> KVCachePool:
    return KVCachePool(QWEN3_8B["layers"], tokens + 1, QWEN3_8B["kv_heads"], QWEN3_8B["head_dim"],
                       torch.bfloat16, "cpu")


def _digest(pool: KVCachePool, slots: list[int]) -> str:
    return hashlib.sha1(pool.buffer[:, :, slots].contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def enter_netns(name: str | None) -> None:
    """Move this thread (and the threads it starts later: the Mooncake engine's) into a network namespace."""
    if not name:
        return
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if ctypes.CDLL("libc.so.6", use_errno=True).setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns into network namespace {name!r} failed")
    finally:
        os.close(fd)


def _transport(backend: str, pool, role: str, name: str, host: str = "127.0.0.1"):
    if backend == "shm":
        from sglang_duet.disagg.transfer import ShmTransport

        return ShmTransport(pool, pool_layout(pool), name, role)
    from sglang_duet.disagg.mooncake import MooncakeTransport

    return MooncakeTransport(pool, pool_layout(pool), name, host)


def _slots(tokens: int, fragmented: bool) -> list[int]:
    slots = list(range(1, tokens + 1))
    if fragmented:
        random.Random(0).shuffle(slots)
    return slots


def _prefill(backends: list[str], tokens: int, fragmented: bool, conn, netns=None, host="127.0.0.1") -> None:
    """Child: one pool per backend (each transport owns how its pool is shared), one export each."""
    import msgspec

    enter_netns(netns)
    keep = []
    for b in backends:
        pool = _pool(tokens)
        t = _transport(b, pool, "prefill", f"prefill-{b}", host)
        pool.buffer.view(torch.uint8).copy_(torch.randint(0, 256, pool.buffer.view(torch.uint8).shape,
                                                          dtype=torch.uint8))
        slots = _slots(tokens, fragmented)
        conn.send((b, msgspec.msgpack.encode(t.export(f"bench-{b}", slots)), _digest(pool, slots)))
        keep.append((pool, t))
    conn.recv()  # the decode side is done
    for _, t in keep:
        t.close()


def run(backends: list[str], tokens: int, repeats: int, fragmented: bool, netns: tuple = (None, None),
        hosts: tuple = ("127.0.0.1", "127.0.0.1")) -> dict:
    """netns / hosts: (prefill's, decode's) network namespace and the address its engine binds."""
    import msgspec

    from sglang_duet.disagg.messages import KVDescriptor

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_prefill, args=(backends, tokens, fragmented, child, netns[0], hosts[0]))
    proc.start()
    enter_netns(netns[1])
    results = {}
    try:
        for _ in backends:
            if not parent.poll(600):
                raise RuntimeError("the prefill process did not export")
            b, desc_bytes, want = parent.recv()
            desc = msgspec.msgpack.decode(desc_bytes, type=KVDescriptor)
            pool = _pool(tokens)
            t = _transport(b, pool, "decode", f"decode-{b}", hosts[1])
            dst = list(range(1, tokens + 1))
            times = []
            for i in range(repeats):
                pool.buffer.zero_()
                stats = t.import_kv(desc, dst)
                times.append(stats.seconds)
                if i == 0 and _digest(pool, dst) != want:
                    raise AssertionError(f"{b}: the imported KV differs from the exported one")
            t.close()
            med = statistics.median(times)
            results[b] = {"bytes": desc.nbytes, "median_s": round(med, 5), "best_s": round(min(times), 5),
                          "gbps_median": round(desc.nbytes / med / 1e9, 3), "times_s": [round(x, 5) for x in times],
                          "byte_exact": True}
            print(f"{b:9s} {desc.nbytes / 1e6:8.1f} MB  median {med * 1e3:8.1f} ms  best {min(times) * 1e3:8.1f} ms  "
                  f"{desc.nbytes / med / 1e9:6.2f} GB/s", flush=True)
    finally:
        parent.send(None)
        proc.join(60)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backends", nargs="+", default=["shm", "mooncake"], choices=["shm", "mooncake"])
    ap.add_argument("--fragmented", action="store_true", help="shuffled source slots (one read per token)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the decode scheduler's share)")
    ap.add_argument("--prefill-netns", help="network namespace of the prefill process (see the docstring)")
    ap.add_argument("--decode-netns", help="network namespace of this (decode) process")
    ap.add_argument("--prefill-host", default="127.0.0.1", help="address the prefill's Mooncake engine binds")
    ap.add_argument("--decode-host", default="127.0.0.1", help="address the decode's Mooncake engine binds")
    ap.add_argument("--out", help="write OUT.json and OUT.md")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    layout = pool_layout(_pool(1))
    print(f"KV of {a.tokens} tokens, Qwen3-8B shape ({layout.bytes_per_token} bytes/token, bfloat16), "
          f"{'fragmented' if a.fragmented else 'contiguous'} slots, {a.repeats} repeats", flush=True)
    results = run(a.backends, a.tokens, a.repeats, a.fragmented, (a.prefill_netns, a.decode_netns),
                  (a.prefill_host, a.decode_host))
    report = {"model_shape": "qwen3-8b", **QWEN3_8B, "dtype": "bfloat16", "bytes_per_token": layout.bytes_per_token,
              "tokens": a.tokens, "fragmented": a.fragmented, "repeats": a.repeats, "threads": a.threads,
              "netns": [a.prefill_netns, a.decode_netns], "hosts": [a.prefill_host, a.decode_host],
              "command": "python benchmark/kv_transfer.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "results": results}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out + ".json").write_text(json.dumps(report, indent=1) + "\n")
        lines = [f"# KV transfer, {a.tokens} tokens of Qwen3-8B-shaped KV ({a.tokens * layout.bytes_per_token / 1e6:.0f} MB)",
                 "", f"`{report['command']}`", "",
                 "| backend | MB | median ms | best ms | GB/s (median) |", "|---|---|---|---|---|"]
        for b, r in results.items():
            lines.append(f"| {b} | {r['bytes'] / 1e6:.1f} | {r['median_s'] * 1e3:.1f} | {r['best_s'] * 1e3:.1f} | "
                         f"{r['gbps_median']:.2f} |")
        Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

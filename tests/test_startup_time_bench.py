"""benchmark/startup_time.py's per-process CPU: the server's spawned children named by their start
order (the launcher starts the scheduler, then the detokenizer), multiprocessing's resource tracker
left out."""
from __future__ import annotations

import multiprocessing as mp
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark.startup_time import per_process_cpu  # noqa: E402


def _child(with_torch: bool, ready, done) -> None:
    if with_torch:
        import torch  # noqa: F401
    ready.set()
    done.wait(60)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_per_process_cpu_names_the_spawned_children_by_role():
    ctx = mp.get_context("spawn")
    done = ctx.Event()
    kids = []
    for with_torch in (True, False):
        ready = ctx.Event()
        p = ctx.Process(target=_child, args=(with_torch, ready, done), daemon=True)
        p.start()
        assert ready.wait(120)
        kids.append(p)
    try:
        cpu = per_process_cpu(os.getpid())
    finally:
        done.set()
        for p in kids:
            p.join(30)
    assert set(cpu) == {"main", "scheduler", "detokenizer"}, cpu
    assert cpu["scheduler"] > cpu["detokenizer"] >= 0  # the first child, the one that imported torch

"""SMPartitioner with the `none` backend (what a CPU can check): grid, rounding, caching, records."""
from __future__ import annotations

import pytest

from sglang_duet.cost_model.hardware import HardwareSpec
from sglang_duet.kernels.sm_partition import PartitionError, SMPartitioner, available_backend


def h100(**kw):
    return SMPartitioner(132, 8, 8, backend=kw.pop("backend", "none"), device="cpu", **kw)


def test_grid_matches_the_hardware_spec():
    p = SMPartitioner.for_device("cpu", HardwareSpec.load("h100"), backend="none")
    assert p.backend == "none" and p.total == 132 and not p.exact_grants
    assert p.grid() == HardwareSpec.load("h100").partition_grid() == list(range(8, 121, 8))
    assert p.sizes() == list(range(8, 121, 8)) + [132]
    assert available_backend(p.device) == "none"


def test_rounding_up_to_the_grid_and_clear_errors():
    p = h100()
    assert [p.round_up(n) for n in (1, 8, 9, 20, 24, 119, 120)] == [8, 8, 16, 24, 24, 120, 120]
    with pytest.raises(PartitionError, match="leaves the prefill side fewer than 8"):
        p.round_up(121)
    with pytest.raises(PartitionError, match="at least one SM"):
        p.round_up(0)
    with pytest.raises(PartitionError, match="backend must be one of"):
        SMPartitioner(132, backend="green", device="cpu")
    with pytest.raises(PartitionError, match="needs a CUDA device"):
        SMPartitioner(132, backend="cuda", device="cpu")
    with pytest.raises(PartitionError, match="bad SM grid"):
        SMPartitioner(12, 8, 8, backend="none", device="cpu")


def test_splits_are_created_once_and_recorded():
    p = h100()
    a = p.split(20)
    assert (a.decode_sms, a.prefill_sms, a.decode_granted, a.prefill_granted) == (24, 108, 24, 108)
    assert a.decode_stream is None and a.prefill_stream is None and not a.disjoint  # CPU: no streams
    assert p.split(24) is a and p.split(17) is a  # cached per grid size
    assert [(r.role, r.requested, r.granted, r.split_of) for r in p.records] == [
        ("decode", 24, 24, 24), ("prefill", 108, 108, 24)]
    # a prefill-side request picks the split whose remainder it is (decode side rounded up)
    assert p.split_for_prefill(108) is a
    b = p.split_for_prefill(101)  # decode side 31 -> 32
    assert (b.decode_sms, b.prefill_sms) == (32, 100)
    assert len(p.records) == 4
    d = p.describe()
    assert d["backend"] == "none" and len(d["contexts"]) == 4 and d["contexts"][0]["role"] == "decode"


def test_single_partitions_and_granted_counts():
    p = h100()
    assert p.stream(8) is None  # CPU: no stream to hand out
    assert p.granted(8) == 8 and p.granted(9) == 16 and p.granted(130) == 132 and p.granted(500) == 132
    assert p.granted(124) == 128  # one partition alone may go past the split grid
    assert [(r.role, r.requested) for r in p.records] == [("single", 8), ("single", 16), ("single", 128)]
    p.granted(16)
    assert len(p.records) == 3
    with pytest.raises(PartitionError):
        p.granted(0)

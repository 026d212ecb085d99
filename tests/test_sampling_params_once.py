"""Sampling params verified once (issue #14): `verify` takes a fast path for the usual request and
`SamplingParams.from_dict(d, vocab_size)` does the work of from_dict(d) then verify(vocab_size), so
the scheduler process admits a request with one verification instead of two. Every outcome, the
params built or the exact error (type and message), must equal the two-stage reference; and the
real scheduler process must answer bad input with the same ReqError as before, verifying once."""
from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest

from sglang_duet.sampling_params import _FIELD_NAMES, SamplingParams, SamplingParamsError
from sglang_duet.server import io_struct as io

VOCAB = 1000


def reference(d, vocab_size):
    """What the scheduler did before: from_dict (build, normalize, every check without the
    vocabulary), then verify(vocab_size) (every check again, the vocabulary's included)."""
    d = dict(d or {})
    if "sampling_seed" in d and "seed" not in d:
        d["seed"] = d.pop("sampling_seed")
    unknown = sorted(set(d) - set(_FIELD_NAMES))
    if unknown:
        raise SamplingParamsError(f"Unknown sampling parameter(s): {', '.join(unknown)}.")
    p = SamplingParams(**d)
    p.normalize()
    p._check(None)
    if vocab_size is not None:
        p._check(vocab_size)
    return p


def outcome(f, *a):
    try:
        return ("ok", repr(f(*a)))
    except Exception as e:  # noqa: BLE001 - the exact error is what is compared
        return (type(e).__name__, str(e))


EDGE = [0, 1, -1, 2, 20, 21, 255, 999, 1000, 1001, -2, 2 ** 62, 2 ** 63, 2 ** 64, -2 ** 63, 10 ** 400,
        0.0, 0.5, 1.0, 1.5, 2.0, -0.5, -2.0, 2.5, 1e-7, 1e300, -1e300, math.inf, -math.inf, math.nan,
        True, False, None, "1", "", [], ["x"], np.float64(0.5), np.float64(math.nan), np.int64(3)]
STOPS = [None, "s", "", ["a", "b"], ["a", ""], ["x" * 512], ["x" * 513], [1], ["a"] * 16, ["a"] * 17, ("a",), [True]]
IDS = [None, [], [1, 2], [999], [1000], [-1], [True], [1.0], [2 ** 70], (1,), "12", [np.int64(4)]]
GRAMMARS = [None, None, None, "", '{"type": "object"}', "a+", 3]


def random_params(rng: random.Random) -> dict:
    d = {}
    for name in _FIELD_NAMES:
        if rng.random() < 0.55:
            continue
        if name == "stop":
            d[name] = rng.choice(STOPS)
        elif name == "stop_token_ids":
            d[name] = rng.choice(IDS)
        elif name in ("json_schema", "regex", "ebnf", "structural_tag"):
            d[name] = rng.choice(GRAMMARS)
        else:
            d[name] = rng.choice(EDGE)
    if rng.random() < 0.05:
        d["sampling_seed"] = rng.choice(EDGE)
    if rng.random() < 0.03:
        d["bogus"] = 1
    return d


def usual(rng: random.Random) -> dict:
    """A request in range, as clients send them (mostly on the fast path)."""
    return {"max_new_tokens": rng.choice([None, 0, 1, 256]), "min_new_tokens": rng.choice([0, 0, 1]),
            "temperature": rng.choice([0, 0.0, 0.7, 1, 2.0]), "top_p": rng.choice([0.9, 1, 1.0]),
            "top_k": rng.choice([-1, 1, 40]), "min_p": rng.choice([0, 0.05, 1.0]),
            "frequency_penalty": rng.choice([-2, 0.0, 2.0]), "presence_penalty": rng.choice([0, 1.5]),
            "repetition_penalty": rng.choice([1.0, 2, 0.5]), "ignore_eos": rng.choice([True, False]),
            "stop": rng.choice([[], ["\n"], "end", None]), "stop_token_ids": rng.choice([[], [5, 999], None]),
            "seed": rng.choice([None, 0, -3, 2 ** 80]), "logprobs": rng.choice([False, True]),
            "top_logprobs": rng.choice([0, 20])}


def test_from_dict_with_the_vocabulary_equals_from_dict_then_verify():
    rng = random.Random(1)
    kinds = set()
    for i in range(6000):
        d = usual(rng) if i % 3 == 0 else random_params(rng)
        if i % 3 == 1:  # a usual request with one field at an edge
            d = usual(rng)
            d[rng.choice(_FIELD_NAMES)] = rng.choice(EDGE)
        for vocab in (None, VOCAB):
            want = outcome(reference, d, vocab)
            assert outcome(SamplingParams.from_dict, d, vocab) == want, d
            kinds.add(want[0] if want[0] != "SamplingParamsError" else want[1].split(" ")[0])
    # the fuzz reaches valid params, range errors of many fields, and the odd non-SamplingParamsError
    assert "ok" in kinds and len(kinds) > 15 and "OverflowError" in kinds


def test_verify_equals_every_check_on_params_built_by_hand():
    rng = random.Random(2)
    fast = 0
    for i in range(6000):
        d = usual(rng) if i % 2 else random_params(rng)
        d.pop("bogus", None)
        d.pop("sampling_seed", None)
        p = SamplingParams(**d)  # not normalized: verify sees a str stop or None lists as they are
        for vocab in (None, VOCAB):
            assert outcome(p.verify, vocab) == outcome(p._check, vocab), d
            fast += p._plainly_valid(vocab)
    assert fast > 1000  # the usual requests do take the fast path


def test_the_fast_path_accepts_nothing_every_check_refuses():
    """Single fields just outside each range, one at a time on a usual request."""
    base = dict(max_new_tokens=16, temperature=0.7, top_p=1.0, top_k=-1, min_p=0.0, stop=["x"],
                stop_token_ids=[3])
    bad = dict(temperature=[-1e-9, math.inf, math.nan, True, 10 ** 400], top_p=[0, 0.0, 1.0000001, math.nan],
               min_p=[-0.1, 1.1], top_k=[0, -2, 1.0, True], frequency_penalty=[2.1, -2.1],
               presence_penalty=[math.inf], repetition_penalty=[0, 2.01], max_new_tokens=[-1, 1.0, 10 ** 400],
               min_new_tokens=[17, -1, True], stop=[[""], ["a"] * 17, ["x" * 513], [3]],
               stop_token_ids=[[1000], [-1], [True], [1.5]], ignore_eos=[1, None], logprobs=[0],
               seed=[1.0, True], top_logprobs=[21, -1, True], regex=[""], json_schema=[3])
    for name, values in bad.items():
        for v in values:
            p = SamplingParams(**{**base, name: v})
            assert not p._plainly_valid(VOCAB), (name, v)
            with pytest.raises((SamplingParamsError, OverflowError)):
                p.verify(VOCAB)
    assert SamplingParams(**base)._plainly_valid(VOCAB)
    for d in ({"max_new_tokens": None, "min_new_tokens": 10 ** 400}, {"top_k": 10 ** 400},
              {"max_new_tokens": 10 ** 400}, {"temperature": 10 ** 400}):
        p = SamplingParams(**d)
        assert not p._plainly_valid(None)
        with pytest.raises(OverflowError):  # math.isfinite of a huge int, as before
            p.verify()


def test_from_dict_leaves_the_callers_dict_alone():
    d = {"sampling_seed": 5, "stop": "x"}
    p = SamplingParams.from_dict(d, VOCAB)
    assert d == {"sampling_seed": 5, "stop": "x"} and p.seed == 5 and p.stop == ["x"]
    assert SamplingParams.from_dict(None) == SamplingParams() == SamplingParams.from_dict([("top_k", -1)])


def _scheduler():
    from sglang_duet.server.args import parse_args
    from sglang_duet.server.ipc import IPCPaths
    from sglang_duet.server.scheduler_proc import SchedulerProcess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = parse_args(["--executor", "emulated", "--emulated-step-ms", "10", "--model-config",
                       os.path.join(repo, "configs", "models", "smollm2-135m.json"), "--max-total-tokens", "4096",
                       "--disable-radix-cache", "--log-level", "warning"])
    paths = IPCPaths.create()
    sched = SchedulerProcess(args, paths)
    return sched, paths


def test_the_scheduler_admits_with_one_verification_and_refuses_as_before(monkeypatch):
    sched, paths = _scheduler()
    sent: list[bytes] = []
    try:
        sched.send = type("Sink", (), {"send": staticmethod(sent.append)})()
        vocab = sched.engine.vocab_size
        calls = {"fast": 0, "check": 0}
        plain, check = SamplingParams._plainly_valid, SamplingParams._check

        def counted_plain(self, v):
            calls["fast"] += 1
            return plain(self, v)

        def counted_check(self, v):
            calls["check"] += 1
            return check(self, v)

        monkeypatch.setattr(SamplingParams, "_plainly_valid", counted_plain)
        monkeypatch.setattr(SamplingParams, "_check", counted_check)
        sched._add(io.GenerateReq("ok", [1, 2, 3], SamplingParams(max_new_tokens=4, ignore_eos=True).to_dict(), 0.0))
        assert calls == {"fast": 1, "check": 0}  # one verification, on the fast path
        assert isinstance(io.decode(sent[-1]), io.DetokRegister)
        cases = [{"top_p": 2.0}, {"stop_token_ids": [vocab]}, {"stop_token_ids": [vocab], "ignore_eos": 1},
                 {"max_new_tokens": True}, {"bogus": 1}, {"stop": [""], "stop_token_ids": [-1]},
                 {"temperature": math.nan}, {"regex": "a", "ebnf": "b"}]
        for i, d in enumerate(cases):
            n = len(sent)
            sched._add(io.GenerateReq(f"bad{i}", [1, 2, 3], d, 0.0))
            (err,) = [io.decode(m) for m in sent[n:]]
            want = outcome(reference, d, vocab)
            assert isinstance(err, io.ReqError) and err.status == 400 and err.rid == f"bad{i}"
            assert ("SamplingParamsError", err.message) == want, d
        n = len(sent)
        sched._add(io.GenerateReq("badid", [1, vocab], {}, 0.0))
        (err,) = [io.decode(m) for m in sent[n:]]
        assert err.message == f"Token id {vocab} is outside the vocabulary [0, {vocab})." and err.status == 400
        assert sched.rejected == len(cases) + 1 and sched.submitted == 1
    finally:
        sched.close()
        paths.cleanup()

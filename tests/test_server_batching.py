"""The serving path's batching, checked by counts and order (never by speed):

- the scheduler's --stream-interval hold-back (one BatchTokenOut per step; first token at once,
  then every N tokens, the end at once; concatenated ids and logprobs exactly the unbatched ones);
- the detokenizer's per-step pass (one decode call for all requests; the same text as one
  request at a time; backlogged messages merged in order, non-token messages kept in place);
- the tokenizer manager's receive path (per-callback cap, order, merged deltas);
- DeviceTimer's critical-path accounting and the constant-step device;
- a server with --stream-interval 4 streams token-exactly what a server with 1 does.
"""
from __future__ import annotations

import asyncio
import random
import time
from types import SimpleNamespace

import httpx
import orjson
import pytest
import zmq

from sglang_duet.core.plan import LaunchResult
from sglang_duet.core.scheduler_core import RequestUpdate
from sglang_duet.server import io_struct as io
from sglang_duet.server.detokenizer_proc import DetokenizerProcess, _ReqDetok
from sglang_duet.server.ipc import IPCPaths, pull_socket, push_socket
from sglang_duet.server.scheduler_proc import DeviceTimer, SchedulerProcess

# ---- scheduler: --stream-interval -----------------------------------------------------------------


class _Sched:
    """SchedulerProcess's output side without an engine or sockets: what it pushes is recorded."""

    _send_updates = SchedulerProcess._send_updates

    def __init__(self, interval: int):
        self.stream_interval = interval
        self._held = {}
        self.pushed = []

    def _push(self, msg) -> None:
        self.pushed.append(io.decode(io.encode(msg)))  # through msgpack, as on the wire


def _updates(n_reqs: int, lengths: list[int], chunk: dict[str, int], logprobs: bool, seed: int):
    """Per step, the updates of every running request, as the core makes them: request r gets
    chunk[r] tokens per step (a look-ahead launch) until it has lengths[r]; r3 is aborted midway."""
    rng = random.Random(seed)
    done = {f"r{i}": 0 for i in range(n_reqs)}
    steps = []
    while any(done[r] < lengths[i] for i, r in enumerate(done)):
        step = []
        for i, r in enumerate(done):
            if done[r] >= lengths[i]:
                continue
            if r == "r3" and done[r] >= 7:  # aborted: an update with no token ends it
                lengths[i] = done[r]
                step.append(RequestUpdate(rid=r, new_token_ids=[], finished=True, prompt_tokens=5,
                                          finish_reason={"type": "abort", "message": "Aborted by the client."},
                                          completion_tokens=done[r]))
                continue
            k = min(chunk[r], lengths[i] - done[r])
            ids = [rng.randrange(1000) for _ in range(k)]
            lps = [{"token_id": t, "logprob": -0.5, "top": [(t, -0.5)]} for t in ids] if logprobs else []
            done[r] += k
            fin = done[r] >= lengths[i]
            reason = {"type": "length", "length": done[r]} if fin else None
            step.append(RequestUpdate(rid=r, new_token_ids=ids, new_logprobs=lps, finished=fin, finish_reason=reason,
                                      prompt_tokens=5, completion_tokens=done[r]))
        steps.append(step)
    return steps


@pytest.mark.parametrize("interval", [1, 2, 3, 8])
@pytest.mark.parametrize("logprobs", [False, True])
def test_stream_interval_holds_back_and_keeps_every_token(interval, logprobs):
    chunk = {"r0": 1, "r1": 1, "r2": 3, "r3": 1, "r4": 2}
    steps = _updates(5, [1, 20, 17, 30, 9], chunk, logprobs, seed=interval)
    ref, out = _Sched(1), _Sched(interval)
    for step in steps:
        ref._send_updates(step)
        out._send_updates(step)
    assert len(ref.pushed) == len(steps)  # interval 1: one BatchTokenOut per step, none empty
    assert len(out.pushed) <= len(steps)  # one message per step at most
    assert not out._held  # nothing left behind once every request ended

    def per_request(msgs):
        got = {}
        for m in msgs:
            assert isinstance(m, io.BatchTokenOut) and m.outs
            seen = set()
            for o in m.outs:
                assert o.rid not in seen  # one output per request per message
                seen.add(o.rid)
                got.setdefault(o.rid, []).append(o)
        return got

    want, got = per_request(ref.pushed), per_request(out.pushed)
    for rid, outs in want.items():
        g = got[rid]
        assert [t for o in g for t in o.new_ids] == [t for o in outs for t in o.new_ids]
        if logprobs:
            assert [lp.token_id for o in g for lp in o.logprobs or ()] == [t for o in outs for t in o.new_ids]
        assert g[-1].finished and g[-1].finish_reason == outs[-1].finish_reason
        assert not any(o.finished for o in g[:-1])
        assert [o.completion_tokens for o in g] == [sum(len(x.new_ids) for x in g[:j + 1]) for j in range(len(g))]
        # the first output goes at once; then one output per `interval` tokens (or more, when a
        # look-ahead step crosses the boundary); the end at once
        assert g[0].new_ids == outs[0].new_ids
        for o in g[1:-1]:
            assert len(o.new_ids) >= interval
        if interval == 1:
            assert len(g) == len(outs)
    # order inside each message follows the order of the step's updates
    for m in out.pushed:
        order = [int(o.rid[1:]) for o in m.outs]
        assert order == sorted(order)


def test_stream_interval_counts_one_token_steps():
    """SGLang's rule for one token per step: tokens 1, 1+N, 1+2N, ... and the last one."""
    steps = _updates(1, [17], {"r0": 1}, False, seed=0)
    s = _Sched(4)
    for step in steps:
        s._send_updates(step)
    assert [len(m.outs[0].new_ids) for m in s.pushed] == [1, 4, 4, 4, 4]
    assert [m.outs[0].completion_tokens for m in s.pushed] == [1, 5, 9, 13, 17]


# ---- detokenizer: one pass per step ------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["Le café est très bon, déjà vu à l'été.", "中文 文本 测试 中文字符", "Emoji 🙂🙂 party 🎉 👍🏽 done",
              "The quick brown fox jumps over the lazy dog. STOP here."] * 20
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<pad>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", pad_token="<pad>",
                                   clean_up_tokenization_spaces=False)


def _bare_detok(tokenizer):
    from sglang_duet.detokenizer import BatchDecoder

    d = DetokenizerProcess.__new__(DetokenizerProcess)
    d.tokenizer, d.decoder, d.reqs = tokenizer, BatchDecoder(tokenizer), {}
    return d


def test_batch_decoder_is_the_tokenizers_decode(tok):
    from sglang_duet.detokenizer import BatchDecoder

    dec = BatchDecoder(tok)
    assert dec.rust is not None  # the stock fast tokenizer takes the batched path
    rng = random.Random(1)
    seqs = [[rng.randrange(len(tok)) for _ in range(rng.randrange(0, 6))] for _ in range(200)]
    for skip in (True, False):
        assert dec.decode(seqs, skip) == [tok.decode(s, skip_special_tokens=skip) if s else "" for s in seqs]


@pytest.mark.parametrize("byte_level", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_detokenizer_step_pass_equals_one_by_one(tok, seed, byte_level):
    """Random requests (some with stop strings, some special tokens, odd chunking, some listed twice
    in a message) through the batched handle() and through _ReqDetok.update one at a time (the
    decode-window path): the same text deltas; with byte_level, the batched side detokenizes by
    bytes (ByteLevelTable) and the same text comes out in total (a character split over tokens may
    show up one output later or earlier), never a stop string."""
    from sglang_duet.detokenizer import ByteLevelTable

    table = ByteLevelTable.build(tok) if byte_level else None
    assert (table is not None) == byte_level  # the fixture is a byte-level BPE
    rng = random.Random(seed)
    texts = ["Le café 中文 🙂 déjà STOP là", "中文字符 and 🎉🎉 emoji 👍🏽!", "plain ascii, nothing fancy here"]
    eos = tok.convert_tokens_to_ids("<eos>")
    batched, single = _bare_detok(tok), {}
    ids = {}
    for i in range(8):
        rid = f"q{i}"
        out = tok.encode(rng.choice(texts), add_special_tokens=False)
        if i % 3 == 0:
            out.insert(rng.randrange(len(out)), eos)
        ids[rid] = out
        reg = io.DetokRegister(rid, [5, 6], ["STOP"] if i % 2 else [], skip_special_tokens=i % 4 != 1)
        batched.reqs[rid] = _ReqDetok(tok, reg, table)
        single[rid] = _ReqDetok(tok, reg)
    pos = {r: 0 for r in ids}
    text_b = {r: "" for r in ids}
    text_s = {r: "" for r in ids}
    while any(pos[r] < len(ids[r]) for r in ids):
        outs = []
        for r in ids:
            if pos[r] >= len(ids[r]):
                continue
            for _ in range(rng.choice((1, 1, 2))):  # sometimes a request twice in one message
                if pos[r] >= len(ids[r]):
                    break
                k = rng.randrange(1, 4)
                new = ids[r][pos[r]:pos[r] + k]
                pos[r] += len(new)
                fin = pos[r] >= len(ids[r])
                outs.append(io.TokenOut(r, new, None, fin, {"type": "length"} if fin else None, 5, pos[r], 0))
        res = batched.handle(io.BatchTokenOut.of(outs))
        assert [o.rid for o in res.outs] == [o.rid for o in outs]
        for o, so in zip(outs, res.outs):
            text_b[o.rid] += so.text
            delta = single[o.rid].update(o)
            text_s[o.rid] += delta
            if not byte_level:
                assert so.text == delta
            if batched.reqs.get(o.rid) is not None and batched.reqs[o.rid].stops:
                assert "STOP" not in text_b[o.rid]
    assert text_b == text_s
    assert not batched.reqs  # finished requests are forgotten


def test_detokenizer_merges_backlog_in_order(tok):
    """Messages waiting together: token batches answered as one BatchStrOut, in order; a ReqError
    between them is forwarded in its place."""
    paths = IPCPaths.create()
    ctx = zmq.Context()
    try:
        main_in = pull_socket(ctx, paths.main_in)
        proc = DetokenizerProcess(paths, None)  # no tokenizer: ids and meta only
        to_detok = push_socket(ctx, paths.detokenizer_in)
        for r in ("a", "b"):
            to_detok.send(io.encode(io.DetokRegister(r, [], [])))
        for step in range(3):
            to_detok.send(io.encode(io.BatchTokenOut.of([io.TokenOut(r, [step], None, False, None, 1, step + 1, 0)
                                                      for r in ("a", "b")])))
        to_detok.send(io.encode(io.ReqError("c", "refused", 400)))
        to_detok.send(io.encode(io.BatchTokenOut.of([io.TokenOut("a", [9], None, True, {"type": "length"}, 1, 4, 0)])))
        time.sleep(0.3)  # all delivered to the socket
        proc.handle_pending()
        got = []
        while main_in.poll(200):
            got.append(io.decode(main_in.recv()))
        assert [type(m).__name__ for m in got] == ["BatchStrOut", "ReqError", "BatchStrOut"]
        assert [(o.rid, o.new_ids) for o in got[0].outs] == [("a", [0]), ("b", [0]), ("a", [1]), ("b", [1]),
                                                             ("a", [2]), ("b", [2])]
        assert [(o.rid, o.new_ids, o.finished) for o in got[2].outs] == [("a", [9], True)]
        assert "a" not in proc.reqs and "b" in proc.reqs
        proc.close()
    finally:
        ctx.destroy(linger=0)
        paths.cleanup()


# ---- tokenizer manager: receive path -------------------------------------------------------------


def test_tokenizer_manager_receive_batches_in_order():
    """Many messages at once: every output reaches its request in order, the deltas a handler sees
    merge what arrived meanwhile, and the handlers run between reader callbacks (the receive path
    never holds the loop for the whole backlog)."""
    from sglang_duet.sampling_params import SamplingParams
    from sglang_duet.server import scheduler_backend as sb
    from sglang_duet.server import tokenizer_manager as tmm
    from sglang_duet.server_args import ServerArgs

    paths = IPCPaths.create()
    info = io.ReadyInfo(status="ready", context_length=4096, vocab_size=1000, kv_slots=100000)
    ctx = zmq.Context()

    async def run():
        tm = tmm.TokenizerManager(ServerArgs(), info, sb.ZmqSchedulerBackend(paths))
        sched_in = pull_socket(ctx, paths.scheduler_in)
        to_main = push_socket(ctx, paths.main_in)
        handled = []  # messages handled per reader callback
        orig_handle, orig_readable = tm._handle_message, tm.backend._on_readable

        def counting(data):
            handled[-1] += 1
            orig_handle(data)

        def readable():
            handled.append(0)
            orig_readable()

        tm._handle_message, tm.backend._on_readable = counting, readable
        tm.start()
        n_req, n_msgs = 5, 3 * sb.RECV_BATCH
        group = tm.submit([(f"x{i}", [1, 2, 3], SamplingParams(max_new_tokens=n_msgs)) for i in range(n_req)])
        for k in range(n_msgs):
            fin = k == n_msgs - 1
            to_main.send(io.encode(io.BatchStrOut([
                io.StrOut(f"x{i}", f"<{k}>", [k], None, fin, {"type": "length"} if fin else None, 3, k + 1, 0)
                for i in range(n_req)])))
        await asyncio.sleep(0.3)  # all delivered and handled (16 messages per reader callback)
        text = {i: "" for i in range(n_req)}
        ids = {i: [] for i in range(n_req)}
        deltas = 0
        while (b := await group.next()) is not None:
            for i, d in b:
                text[i] += d.text
                ids[i] += d.ids
                deltas += 1
        group.close()
        for i in range(n_req):
            assert ids[i] == list(range(n_msgs))
            assert text[i] == "".join(f"<{k}>" for k in range(n_msgs))
        assert deltas < n_req * n_msgs  # a backlog is merged into fewer, larger deltas
        assert sum(handled) == n_msgs and max(handled) <= sb.RECV_BATCH  # the loop is let go in between
        assert tm.counts == {"submitted": n_req, "finished": n_req, "failed": 0, "aborted": 0}
        assert sched_in.poll(100)  # the GenerateReqs went out
        tm.close()
        sched_in.close(0)
        to_main.close(0)

    try:
        asyncio.run(run())
    finally:
        ctx.destroy(linger=0)
        paths.cleanup()


# ---- DeviceTimer ----------------------------------------------------------------------------------


class _FakeExecutor:
    concurrent_lanes = True

    def __init__(self):
        self.results = []

    def submit(self, launch):
        pass

    def poll(self, timeout=None):
        out, self.results = self.results, []
        return out


def test_device_timer_counts_host_gaps_only_while_busy():
    now = [0.0]
    cpu = [0.0]
    inner = _FakeExecutor()
    t = DeviceTimer(inner, clock=lambda: now[0], cpu_clock=lambda: cpu[0])
    assert t.concurrent_lanes  # the executor's attributes show through
    t.submit(SimpleNamespace(launch_id=1))  # from idle: no gap
    inner.results = [LaunchResult(1, started_at=0.0, finished_at=0.010)]
    now[0] = 0.0102  # the poll returns 0.2 ms after the device finished
    cpu[0] = 1.0  # (the CPU clock is read when the poll starts)
    assert len(t.poll(0.1)) == 1
    now[0] = 0.01045
    cpu[0] = 1.0001  # 0.1 ms of CPU in the gap
    t.submit(SimpleNamespace(launch_id=2))  # 0.45 ms gap, 0.2 of it waking up
    inner.results = [LaunchResult(2, started_at=0.0105, finished_at=0.0205, final=False)]
    now[0] = 0.0206
    t.poll(0.1)  # a partial result: the launch still runs, no gap starts
    inner.results = [LaunchResult(2, started_at=0.0105, finished_at=0.0305)]
    now[0] = 0.0306
    t.poll(0.1)
    t.idle()  # the engine ran out of work: what follows is not the host's doing
    now[0] = 5.0
    t.submit(SimpleNamespace(launch_id=3))
    s = t.stats()
    assert s["gaps"] == 1
    assert s["gap_s"] == pytest.approx(0.00045)
    assert s["wake_s"] == pytest.approx(0.0002)
    assert s["cpu_s"] == pytest.approx(0.0001)
    assert sum(s["hist"]) == 1 and s["hist"][s["edges_ms"].index(0.5)] == 1  # the (0.3, 0.5] ms bucket
    # the device's own view: launch 2 started 0.5 ms after launch 1 ended; nothing after idle()
    assert s["device_idle_gaps"] == 1 and s["device_idle_s"] == pytest.approx(0.0005)
    assert s["final_results"] == 2


def test_device_timer_counts_a_late_overlapped_launch_as_device_idle():
    """Overlap: launch 2 is handed over before launch 1's result is read, so it follows no host gap;
    but it was handed over after launch 1 had ended and started 2 ms late: that is device idle time."""
    now = [0.0]
    inner = _FakeExecutor()
    t = DeviceTimer(inner, clock=lambda: now[0], cpu_clock=lambda: 0.0)
    t.submit(SimpleNamespace(launch_id=1, lane="aggregated"))
    now[0] = 0.012
    t.submit(SimpleNamespace(launch_id=2, lane="aggregated"))  # one still in flight: overlapped
    inner.results = [LaunchResult(1, started_at=0.0, finished_at=0.010),
                     LaunchResult(2, started_at=0.012, finished_at=0.022)]
    now[0] = 0.0221
    t.poll(0.1)
    s = t.stats()
    assert s["overlapped"] == 1 and s["gaps"] == 0
    assert s["device_idle_gaps"] == 1 and s["device_idle_s"] == pytest.approx(0.002)


# ---- the constant-step device ----------------------------------------------------------------


def test_constant_device_costs_exactly_the_step():
    from sglang_duet.cost_model.constant import ConstantCostModel, install_constant_device
    from sglang_duet.engine_core import EngineCore
    from sglang_duet.sampling_params import SamplingParams
    from sglang_duet.server_args import ServerArgs

    from server_utils import REPO

    e = EngineCore(ServerArgs(executor="emulated", model_config=f"{REPO}/configs/models/smollm2-135m.json",
                              max_total_tokens=20000))
    cm = install_constant_device(e, 4.0)
    assert isinstance(cm, ConstantCostModel) and e.executor.cm is cm
    assert cm.batch_time([(1, 10)]) == cm.batch_time([(8192, 0)] * 3, sms=10) == 0.004
    assert cm.batch_time([]) == 0.0
    for i in range(40):  # a prefill of 40 x 100 tokens, then decodes of 40
        e.add_request(f"c{i}", list(range(100, 200)), SamplingParams(max_new_tokens=3, ignore_eos=True))
    spans = []
    orig = e.executor.poll

    def poll(timeout=None):
        res = orig(timeout)
        spans.extend(r.finished_at - r.started_at for r in res)
        return res

    e.executor.poll = poll
    while e.has_work():
        e.step(0.05)
    assert len(spans) == 3  # one prefill step, two decode steps
    assert all(s == pytest.approx(0.004, abs=1e-9) for s in spans)


# ---- a server with --stream-interval ----------------------------------------------------------------


def _stream(base: str, body: dict) -> list[dict]:
    with httpx.stream("POST", base + "/generate", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        text = r.read().decode()
    events = [orjson.loads(ln[6:]) for ln in text.splitlines() if ln.startswith("data: {")]
    assert text.rstrip().endswith("data: [DONE]")
    return events


def test_server_stream_interval_token_exact():
    """--stream-interval 4: each stream's cumulative text and ids end exactly as the same request's
    non-streaming answer (which is what a stream with interval 1 concatenates to: the emulated
    tokens are a function of the seed and position only), with outputs at tokens 1, 5, 9, ..."""
    from hardening_utils import emulated_args
    from server_utils import ServerProcess

    bodies = [{"text": "Once upon a time", "stream": True,
               "sampling_params": {"max_new_tokens": 17, "ignore_eos": True, "seed": 3}},
              {"input_ids": [400, 401, 402], "stream": True,
               "sampling_params": {"max_new_tokens": 10, "ignore_eos": True, "seed": 5, "stop": ["xyz q"]}},
              {"text": "Hello", "stream": True, "return_logprob": True,
               "sampling_params": {"max_new_tokens": 6, "ignore_eos": True, "seed": 7}}]
    # 5 ms steps: outputs of different steps usually reach the client as different events
    with ServerProcess(emulated_args("--stream-interval", "4", "--emulated-step-ms", "5")) as s:
        for body in bodies:
            events = _stream(s.base_url, body)
            plain = httpx.post(s.base_url + "/generate", json=dict(body, stream=False), timeout=120).json()
            last = events[-1]
            assert last["text"] == plain["text"] and last["output_ids"] == plain["output_ids"]
            assert last["meta_info"]["finish_reason"] == plain["meta_info"]["finish_reason"]
            if body.get("return_logprob"):
                assert last["meta_info"]["output_token_logprobs"] == plain["meta_info"]["output_token_logprobs"]
            counts = [e["meta_info"]["completion_tokens"] for e in events]
            assert counts == [len(e["output_ids"]) for e in events]
            n = counts[-1]
            assert n == body["sampling_params"]["max_new_tokens"]
            # Outputs leave the scheduler at tokens 1, 5, 9, ... and the last; the main process may
            # merge outputs that arrive while a handler is busy (never split them).
            assert set(counts) <= {1, *range(5, n + 1, 4), n} and counts == sorted(set(counts))
            for a, b in zip(events, events[1:]):  # cumulative text only ever grows by appending
                assert b["text"].startswith(a["text"])
        info = httpx.get(s.base_url + "/get_server_info", timeout=10).json()
        assert info["stream_interval"] == 4
    assert s.stop() == 0, s.log_tail()

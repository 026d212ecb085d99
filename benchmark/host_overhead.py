"""Host overhead against the physical limit: the real server on a device that costs a fixed time per step.

The server is the real one (`python -m sglang_duet.launch_server`: HTTP, tokenizer manager,
scheduler loop, detokenizer with the embedded SmolLM2 tokenizer), its executor the emulated GPU
with a constant step (`--executor emulated --emulated-step-ms MS`, sglang_duet/cost_model/
constant.py): every launch, a prefill of 8192 tokens or a decode step of 1024 requests, costs
exactly MS milliseconds. So the device alone allows a known rate, and everything a client gets
below it is the host's doing.

For each level, N streaming clients arrive at once, each with a P-token prompt and O output
tokens (ignore_eos). With the aggregated policy (prefill first) the device needs at least
ceil(N*P / chunked_prefill_size) prefill steps (they produce every request's first token) and
O - 1 decode steps, so

    device limit = N * O / ((ceil(N*P / C) + O - 1) * step)

Reported per level: delivered output tokens/s (tokens received by the clients / time from
sending the first request to receiving the last token), the device limit, their ratio, the
scheduler's launches (how many steps the device really ran), the host time on the critical path
per step (the scheduler's own timing, `critical_path` in /get_server_info: the device's idle time
between one launch's end and the next one's start, per launch, overlapped or not; and the host
gaps, launches handed over only after the device had gone idle, with the scheduler's CPU time in
them), the scheduler process's CPU time per launch (all of its work: less sensitive to a loaded
machine than wall time), and the clients' inter-token latency (gap between reads / tokens in
them). At 1 stream, ITL p50 minus the step is what the serving path adds per token.

The client is a raw asyncio protocol per stream (the request written by hand, each read scanned
for the last cumulative completion_tokens): it shares the cores with the server, so it does as
little as it can (an aiohttp client cost about 3x more CPU per token), on uvloop (`--client-loop`;
asyncio's selector loop took about twice the CPU).

    python benchmark/host_overhead.py [--streams 1,64,256,1024] [--step-ms 10] [--output-len 256]
        [--stream-interval 1] [--repeats 3] [--out benchmark/results/host_overhead-cpu2.md]

`--cpu-per-step` measures instead, in this process, the CPU time per decode step of the scheduler
process's work (core, policy, the emulated device's host side, the step's message), of the
detokenizer's, and of the main process's fan-out (the tokenizer manager and the streaming
/generate handlers rendering each event, up to the socket write), at each batch of --streams
(thread CPU time: a loaded machine moves it far less than the wall-clock ratios above).

`--admission` measures the main process's CPU time per request instead: N streaming requests of
one output token sent at once on fresh connections (the admission burst of a level: HTTP, body
parsing, validation, tokenizing or chat templating, the send to the scheduler, the stream's setup
and its one event), for native /generate with input_ids and with text, /v1/completions with text, and
/v1/chat/completions; CPU seconds of each process (from /proc) per request, the median of
--repeats bursts.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmark.server_process import ServerProcess  # noqa: E402

MODEL_CONFIG = os.path.join(REPO, "configs", "models", "smollm2-135m.json")
TOKEN_LO, TOKEN_HI = 100, 40000  # prompt ids: ordinary tokens of the embedded tokenizer


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def device_limit(n: int, prompt_len: int, output_len: int, step_s: float, chunk: int) -> tuple[float, int]:
    """(tokens/s the device alone allows, minimum device steps) for n requests arriving at once."""
    steps = math.ceil(n * prompt_len / chunk) + output_len - 1
    return n * output_len / (steps * step_s), steps


def server_flags(a, max_streams: int) -> list[str]:
    kv = max_streams * (a.prompt_len + a.output_len) + 4096
    return ["--executor", "emulated", "--emulated-step-ms", str(a.step_ms), "--model-config", MODEL_CONFIG,
            "--policy", a.policy, "--max-total-tokens", str(kv), "--max-running-requests", str(max_streams),
            "--chunked-prefill-size", str(a.chunk), "--stream-interval", str(a.stream_interval),
            "--log-level", "warning", *a.server_arg]


# ---- client ---------------------------------------------------------------------------------------


class Stream:
    __slots__ = ("tokens", "times", "counts", "error", "sent_at")

    def __init__(self):
        self.sent_at = 0.0  # when the request was written (the client's own admission spread)
        self.tokens = 0
        self.times: list[float] = []  # receive time of each read carrying tokens
        self.counts: list[int] = []  # tokens in that read
        self.error = ""


_COUNT = b'"completion_tokens":'
_DONE = b"data: [DONE]"


def completion_tokens(event: bytes) -> int:
    """meta_info.completion_tokens of one /generate event, without parsing its (cumulative, long)
    text and output_ids: the client shares the CPU with the server, so it does as little as it can."""
    n = last_completion_tokens(event)
    if n is None:
        raise ValueError(f"no completion_tokens in {event[:200]!r}")
    return n


def last_completion_tokens(data: bytes) -> int | None:
    """The last complete `"completion_tokens":N` in data (None if there is none)."""
    i = data.rfind(_COUNT)
    while i >= 0:
        j = k = i + len(_COUNT)
        while k < len(data) and data[k] in b" 0123456789":
            k += 1
        if k < len(data) and data[j:k].strip():  # the number is followed by something: complete
            return int(data[j:k])
        i = data.rfind(_COUNT, 0, i)
    return None


class _StreamClient(asyncio.Protocol):
    """One streaming /generate over a raw connection: the client shares the 2 cores with the
    server, so instead of an HTTP library it writes the request and scans what arrives for the
    last cumulative completion_tokens (one rfind per read, whatever the chunking)."""

    TAIL = 96  # bytes kept between reads: a count split over two reads is found in the next one

    def __init__(self, request: bytes, st: Stream, done: asyncio.Future):
        self.request, self.st, self.done = request, st, done
        self.tail = b""
        self.status_checked = False
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)
        self.st.sent_at = time.perf_counter()

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        st = self.st
        buf = self.tail + data if self.tail else data
        if not self.status_checked:
            self.status_checked = True
            if not buf.startswith(b"HTTP/1.1 200"):
                st.error = buf[:300].decode(errors="replace")
                self._finish()
                return
        if b'data: {"error"' in buf:
            i = buf.index(b'data: {"error"')
            st.error = buf[i + 6:i + 500].decode(errors="replace")
            self._finish()
            return
        n = last_completion_tokens(buf)
        if n is not None and n > st.tokens:
            st.times.append(now)
            st.counts.append(n - st.tokens)
            st.tokens = n
        if _DONE in buf:
            self._finish()
            return
        self.tail = buf[-self.TAIL:]

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            if self.st.tokens == 0 and not self.st.error:
                self.st.error = f"connection lost: {exc}"
            self.done.set_result(None)

    def _finish(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if not self.done.done():
            self.done.set_result(None)


async def stream_one(host: str, port: int, ids: list[int], output_len: int, st: Stream) -> None:
    import orjson

    body = orjson.dumps({"input_ids": ids, "stream": True,
                         "sampling_params": {"max_new_tokens": output_len, "ignore_eos": True, "temperature": 0.0}})
    req = (f"POST /generate HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    try:
        await loop.create_connection(lambda: _StreamClient(req, st, done), host, port)
        await done
    except Exception as e:  # noqa: BLE001 - reported as a failed stream
        st.error = f"{type(e).__name__}: {e}"


async def run_level(base_url: str, n: int, prompt_len: int, output_len: int, seed: int) -> dict:
    import aiohttp

    host, port = base_url.rsplit("//", 1)[1].rsplit(":", 1)
    rng = random.Random(seed)
    prompts = [[rng.randrange(TOKEN_LO, TOKEN_HI) for _ in range(prompt_len)] for _ in range(n)]
    streams = [Stream() for _ in range(n)]
    health: list[float] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as s:
        t0 = time.perf_counter()
        probe = asyncio.create_task(probe_health(s, base_url, health))
        await asyncio.gather(*(stream_one(host, int(port), p, output_len, st) for p, st in zip(prompts, streams)))
        probe.cancel()
    errors = [st.error for st in streams if st.error]
    tokens = sum(st.tokens for st in streams)
    t_last = max((st.times[-1] for st in streams if st.times), default=t0)
    gaps = []
    for st in streams:
        for i in range(1, len(st.times)):
            k = st.counts[i]
            gaps.extend([(st.times[i] - st.times[i - 1]) / k] * k)
    ttft = [st.times[0] - t0 for st in streams if st.times]
    return {"streams": n, "tokens": tokens, "expected": n * output_len, "errors": errors,
            "events": sum(len(st.times) for st in streams), "wall_s": t_last - t0,
            "tok_s": tokens / max(t_last - t0, 1e-9), "itl_p50_ms": pct(gaps, 0.5) * 1e3,
            "itl_p99_ms": pct(gaps, 0.99) * 1e3, "ttft_p50_ms": pct(ttft, 0.5) * 1e3,
            "ttft_max_ms": max(ttft, default=float("nan")) * 1e3,
            "sent_ms": (max((st.sent_at for st in streams), default=t0) - t0) * 1e3,
            "health_p50_ms": pct(health, 0.5) * 1e3, "health_max_ms": max(health, default=float("nan")) * 1e3}


async def probe_health(session, base_url: str, out: list[float], every_s: float = 0.1) -> None:
    """GET /health every 100 ms while the streams run: how long the main process's event loop takes
    to answer a request that needs no scheduler (its responsiveness under the load)."""
    while True:
        t = time.perf_counter()
        try:
            async with session.get(f"{base_url}/health") as r:
                await r.read()
            out.append(time.perf_counter() - t)
        except Exception:  # noqa: BLE001 - a probe that fails is not a data point
            pass
        await asyncio.sleep(every_s)


# ---- server-side accounting ------------------------------------------------------------------------


def server_state(base_url: str) -> dict:
    import orjson

    with urllib.request.urlopen(f"{base_url}/get_server_info", timeout=10) as r:
        return orjson.loads(r.read())["internal_states"][0]


def settled_state(base_url: str, finished_at_least: int, timeout_s: float = 30.0) -> dict:
    """The scheduler's stats once they include every request of the level (it reports them as
    soon as it goes idle)."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = server_state(base_url)
        if (s.get("finished", 0) + s.get("aborted", 0) >= finished_at_least and s.get("num_running_reqs") == 0) \
                or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


def critical_path_delta(before: dict, after: dict) -> dict:
    b, a = before.get("critical_path") or {}, after.get("critical_path") or {}
    n = a.get("gaps", 0) - b.get("gaps", 0)
    overlapped = a.get("overlapped", 0) - b.get("overlapped", 0)  # launches that followed no idle gap
    # the device's own view (DeviceTimer.device_idle_s): time between a launch's end and the next
    # one's start on its lane, overlapped or not, per launch
    finals = a.get("final_results", 0) - b.get("final_results", 0)
    idle = {"idle_ms": (a.get("device_idle_s", 0.0) - b.get("device_idle_s", 0.0)) / finals * 1e3 if finals else float("nan"),
            "idle_gaps": a.get("device_idle_gaps", 0) - b.get("device_idle_gaps", 0)}
    if n <= 0:
        return {"gaps": 0, "overlapped": overlapped, "mean_ms": float("nan"), "wake_ms": float("nan"),
                "cpu_ms": float("nan"), "p50_ms": float("nan"), "p99_ms": float("nan"), **idle}
    hist = [x - y for x, y in zip(a["hist"], b.get("hist") or [0] * len(a["hist"]))]
    edges = a["edges_ms"]

    def q(frac: float) -> float:  # upper edge of the bucket holding the quantile
        acc, target = 0, frac * n
        for i, c in enumerate(hist):
            acc += c
            if acc >= target:
                return edges[i] if i < len(edges) else float("inf")
        return float("inf")

    return {"gaps": n, "overlapped": overlapped, "mean_ms": (a["gap_s"] - b.get("gap_s", 0.0)) / n * 1e3,
            "wake_ms": (a["wake_s"] - b.get("wake_s", 0.0)) / n * 1e3,
            "cpu_ms": (a.get("cpu_s", float("nan")) - b.get("cpu_s", 0.0)) / n * 1e3, "p50_ms": q(0.5), "p99_ms": q(0.99),
            **idle}


def process_cpu(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) each process has used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, pid in pids.items():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            out[name] = float("nan")
    return out


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                out.add(link[8:-1])
    except OSError:
        pass
    return out


def server_pids(main_pid: int) -> dict[str, int]:
    """main, scheduler and detokenizer pids: each child is the process holding the unix socket it
    binds in this server's private IPC dir (`DIR/scheduler`, `DIR/detokenizer`; the main process
    binds `DIR/main`)."""
    paths = {}
    try:
        with open("/proc/net/unix") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and "/sglang-duet-" in parts[-1]:
                    paths[parts[6]] = parts[-1]
    except OSError:
        return {"main": main_pid}
    mine = [paths[i] for i in _socket_inodes(main_pid) if i in paths and paths[i].endswith("/main")]
    pids = {"main": main_pid}
    if not mine:
        return pids
    root = mine[0].rsplit("/", 1)[0]
    want = {i: p.rsplit("/", 1)[1] for i, p in paths.items() if p.rsplit("/", 1)[0] == root}
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != main_pid:
            for i in _socket_inodes(int(d)):
                if want.get(i) in ("scheduler", "detokenizer"):
                    pids[want[i]] = int(d)
    return pids


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def client_runner(a) -> asyncio.Runner:
    """The clients' event loop: uvloop by default (`--client-loop`). The client shares the 2 cores with
    the server's processes, so its CPU per token is taken from what the server gets; on asyncio's
    selector loop the client took about twice the CPU (1024 streams, interval 8: 0.68-1.24 s per
    level against 0.44-0.56 s on uvloop, load 5)."""
    if getattr(a, "client_loop", "uvloop") == "uvloop":
        import uvloop

        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    return asyncio.Runner()


def measure(srv_url: str, a, n: int, seed: int, pids: dict[str, int] | None = None) -> dict:
    before = server_state(srv_url)
    done_before = before.get("finished", 0) + before.get("aborted", 0)
    pids = dict(pids or {}, client=os.getpid())
    cpu0 = process_cpu(pids)
    load0 = load_average()
    with client_runner(a) as runner:
        r = runner.run(run_level(srv_url, n, a.prompt_len, a.output_len, seed))
    cpu1 = process_cpu(pids)
    r["cpu_s"] = {k: cpu1[k] - cpu0[k] for k in pids}
    r["load"] = (load0 + load_average()) / 2  # 1-minute load average around the level (other work on the machine)
    after = settled_state(srv_url, done_before + n)
    limit, min_steps = device_limit(n, a.prompt_len, a.output_len, a.step_ms / 1e3, a.chunk)
    launches = sum((after.get("launches") or {}).values()) - sum((before.get("launches") or {}).values())
    r.update(limit_tok_s=limit, ratio=r["tok_s"] / limit, min_steps=min_steps, launches=launches,
             cp=critical_path_delta(before, after), added_ms=r["itl_p50_ms"] - a.step_ms,
             sched_cpu_ms=r["cpu_s"].get("scheduler", float("nan")) / max(launches, 1) * 1e3,
             # the device's busy share of the level: what the host's critical path left of the time
             # (launches beyond the minimum are prefills of requests that arrived over several steps)
             busy=launches * a.step_ms / 1e3 / max(r["wall_s"], 1e-9))
    return r


# ---- CPU time per step, in process -----------------------------------------------------------------


def step_cpu(n: int, a, steps: int = 40) -> dict:
    """CPU time per decode step of the host's work at batch n, in this process (no HTTP socket, no
    client, no sleeping): the real SchedulerProcess (core, policy, the emulated constant-step device
    on a virtual clock, the step's BatchTokenOut encoded), the real DetokenizerProcess handling those
    messages, and the main process's fan-out of its BatchStrOut: the real TokenizerManager and n
    streaming /generate handlers (NativeServing + SSEStream), each event rendered and handed to a
    writer that only counts it (from the receive loop, as under uvicorn's httptools; the first and
    the last through the woken handler and its ASGI send; uvicorn's chunk framing and the socket
    write are not included). Thread CPU time, so a loaded machine moves it far less than wall time. Returns
    ms per step by part."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # the server's event loop
        return runner.run(_step_cpu(n, a, steps))


class _CaptureBackend:
    """The tokenizer manager's backend in --cpu-per-step: requests are handed to the in-process
    scheduler by the benchmark instead of a socket."""

    def __init__(self):
        self.reqs: list = []

    def start(self, tm) -> None:
        pass

    def send_generate(self, reqs) -> None:
        self.reqs.extend(reqs)

    def send_abort(self, rid: str) -> None:
        pass

    def send_flush_cache(self) -> None:
        pass

    def unavailable(self):
        return None

    def internal_state(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class _NoDisconnect:
    async def is_disconnected(self) -> bool:
        return False


class _CountingWriter:
    """The stream's direct writer (sse.direct_writer), as uvicorn's httptools send gets one: counts
    the events the receive loop writes without waking the handler."""

    def __init__(self, counts: list[int]):
        self.counts = counts

    def ready(self) -> bool:
        return True

    def write(self, body: bytes) -> None:
        self.counts[0] += 1

    def abort(self) -> None:
        pass


async def _native_stream(native, ids: list[int], out_len: int, counts: list[int]) -> None:
    """One streaming /generate through the real handler; its ASGI send and its direct writer (the
    running events, as served by uvicorn's httptools) count the events."""
    body = {"input_ids": ids, "stream": True, "sampling_params": {"max_new_tokens": out_len, "ignore_eos": True}}
    response = await native.generate(_NoDisconnect(), body)

    async def send(message) -> None:
        if message.get("body"):
            counts[0] += 1

    async def receive():
        await asyncio.get_running_loop().create_future()  # the client never leaves

    send.sse_writer = _CountingWriter(counts)
    await response({"type": "http"}, receive, send)


async def _step_cpu(n: int, a, steps: int) -> dict:
    import gc

    from sglang_duet.server import io_struct as io
    from sglang_duet.server.args import parse_args
    from sglang_duet.server.detokenizer_proc import DetokenizerProcess
    from sglang_duet.server.ipc import IPCPaths, tune_gc
    from sglang_duet.server.native_api import NativeServing
    from sglang_duet.server.scheduler_proc import SchedulerProcess
    from sglang_duet.server.tokenizer_manager import TokenizerManager

    out_len = steps + 12
    args = parse_args(["--executor", "emulated", "--emulated-step-ms", str(a.step_ms), "--model-config", MODEL_CONFIG,
                       "--policy", a.policy, "--max-total-tokens", str(n * (a.prompt_len + out_len) + 4096),
                       "--max-running-requests", str(n), "--chunked-prefill-size", str(a.chunk),
                       "--stream-interval", str(a.stream_interval), "--log-level", "warning", *a.server_arg])
    paths = IPCPaths.create()
    sent: list[bytes] = []
    events = [0]  # SSE writes handed to the handlers' ASGI send
    tasks: list[asyncio.Task] = []
    try:
        sched = SchedulerProcess(args, paths)
        sched.timer.inner.mode = "virtual"  # the device's time passes at once: only host work is left
        sched.send = type("Sink", (), {"send": staticmethod(sent.append)})()
        info = sched.ready_info()
        detok = DetokenizerProcess(paths, info.tokenizer_dir)
        backend = _CaptureBackend()
        tm = TokenizerManager(args, info, backend)
        native = NativeServing(tm)
        rng = random.Random(a.seed)
        tasks = [asyncio.ensure_future(_native_stream(native, [rng.randrange(TOKEN_LO, TOKEN_HI) for _ in range(a.prompt_len)],
                                                      out_len, events)) for _ in range(n)]
        await _settle()  # every handler has submitted its request and waits for its first output
        for req in backend.reqs:
            sched._add(io.decode(io.encode(req)))
        engine, core = sched.engine, sched.engine.core
        parts = {"apply": 0.0, "plan": 0.0, "executor": 0.0, "plan.view": 0.0, "plan.resolve": 0.0,
                 "executor.price": 0.0, "executor.results": 0.0}

        def timed(obj, name, part):
            f = getattr(obj, name)

            def g(*args, **kw):
                t = time.thread_time()
                try:
                    return f(*args, **kw)
                finally:
                    parts[part] += time.thread_time() - t
            setattr(obj, name, g)

        timed(core, "apply_result", "apply")
        timed(core, "schedule", "plan")
        timed(sched.timer, "poll", "executor")
        timed(sched.timer, "submit", "executor")
        # inside those (printed, not in the table): the view, resolving the plan, the emulated
        # device's pricing and its building of each step's results
        timed(core, "view", "plan.view")
        timed(core, "_resolve", "plan.resolve")
        timed(sched.timer.inner, "price", "executor.price")
        timed(sched.timer.inner, "_report", "executor.results")

        async def one_step() -> tuple[float, float, float, float]:
            t0 = time.thread_time()
            results = sched.timer.final_results
            updates = engine.step(None)  # the loop's order: launch, wait for a result, apply it
            # (with --stream-interval the core may build no update for a step: a result came all the same)
            if (updates or sched.timer.final_results != results) and core.can_plan() and engine.has_work():
                updates += engine.step(0.0)  # plan the step behind the running one
            t1 = time.thread_time()
            if updates:
                sched._send_updates(updates)
            t2 = time.thread_time()
            to_main = []
            for data in sent:
                msg = io.decode(data)
                if isinstance(msg, io.DetokRegister):
                    detok.reqs[msg.rid] = _detok_state(detok, msg)
                elif isinstance(msg, io.BatchTokenOut):
                    to_main.append(io.encode(detok.handle(msg)))
            sent.clear()
            t3 = time.thread_time()
            for data in to_main:
                tm._handle_message(data)
            await _settle()  # every woken handler has rendered and sent its event
            return t1 - t0, t2 - t1, t3 - t2, time.thread_time() - t3

        tune_gc()
        for _ in range(8):  # admission and prefill: every request decoding afterwards
            await one_step()
        if core.num_running != n:
            raise RuntimeError(f"step_cpu: {core.num_running} of {n} requests running after the warm-up")
        for k in parts:
            parts[k] = 0.0
        tot = {"engine": 0.0, "send": 0.0, "detok": 0.0, "main": 0.0}
        events[0] = 0
        gc_before = sum(s["collections"] for s in gc.get_stats())
        for _ in range(steps):
            e, s_, d, m = await one_step()
            tot["engine"] += e
            tot["send"] += s_
            tot["detok"] += d
            tot["main"] += m
        collections = sum(s["collections"] for s in gc.get_stats()) - gc_before
        sse_events = events[0]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        sched.close()
        detok.close()
        tm.close()
    finally:
        for t in tasks:
            t.cancel()
        paths.cleanup()
    ms = {k: v / steps * 1e3 for k, v in {**tot, **parts}.items()}
    ms["scheduler"] = ms["engine"] + ms["send"]
    return {"streams": n, "steps": steps, "gc": collections, "events": sse_events, **ms}


async def _settle(rounds: int = 4) -> None:
    """Let the event loop run what is ready: woken handlers render, send and wait again."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def _detok_state(detok, reg):
    from sglang_duet.server.detokenizer_proc import _ReqDetok

    table = getattr(detok, "table", None)
    return _ReqDetok(detok.tokenizer, reg, table) if table is not None else _ReqDetok(detok.tokenizer, reg)


def cpu_table(rows: list[dict]) -> list[str]:
    lines = ["| batch | scheduler ms/step | of it: apply_result | schedule (view, policy, resolve) "
             "| executor (emulated: submit, poll, results) | updates encoded + sent | detokenizer ms/step "
             "| main fan-out ms/step (SSE events per step) | us per request per step: scheduler / detokenizer / main |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        per = r["streams"] / 1e3
        lines.append(f"| {r['streams']} | **{r['scheduler']:.3f}** | {r['apply']:.3f} | {r['plan']:.3f} "
                     f"| {r['executor']:.3f} | {r['send']:.3f} | **{r['detok']:.3f}** "
                     f"| **{r['main']:.3f}** ({r['events'] / r['steps']:.0f}) "
                     f"| {r['scheduler'] / per:.2f} / {r['detok'] / per:.2f} / {r['main'] / per:.2f} |")
    return lines


# ---- main -----------------------------------------------------------------------------------------


def append_result_section(path: str, title: str, cmd: str, lines: list[str]) -> None:
    """Append one run's table to a results file under benchmark/results/, with the machine and command."""
    text = "\n".join([f"## {title}", "", f"Machine: {machine()}.", "", f"Command: `{cmd}`", "", *lines, ""])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(text + "\n")


def machine() -> str:
    from sglang_duet.cost_model.cpu_calibration import cpu_name

    return f"{os.cpu_count()}-core CPU ({cpu_name()}), no GPU, Python {platform.python_version()}"


def run(a) -> list[dict]:
    """Start the server, run every level `repeats` times; returns the median row per level (by ratio)."""
    levels = [int(x) for x in a.streams.split(",")]
    work = tempfile.mkdtemp(prefix="host-overhead-")
    rows = []
    with ServerProcess(server_flags(a, max(levels)), os.path.join(work, "server.log"), env=a.env).start() as srv:
        asyncio.run(run_level(srv.base_url, min(8, max(levels)), a.prompt_len, 8, a.seed))  # warm-up
        pids = server_pids(srv.proc.pid)
        for n in levels:
            reps = []
            for rep in range(a.repeats):
                r = measure(srv.base_url, a, n, a.seed + 1000 * n + rep, pids)
                reps.append(r)
                cp = r["cp"]
                print(f"streams={n} rep={rep}: {r['tokens']}/{r['expected']} tokens, {r['tok_s']:.0f} tok/s = "
                      f"{r['ratio']:.1%} of {r['limit_tok_s']:.0f}; launches {r['launches']} (min {r['min_steps']}), device busy "
                      f"{r['busy']:.1%}; "
                      f"device idle {cp['idle_ms']:.3f} ms/launch ({cp['idle_gaps']} gaps); host gaps {cp['gaps']} "
                      f"mean {cp['mean_ms']:.3f} ms (CPU {cp['cpu_ms']:.3f} ms), {cp['overlapped']} overlapped; "
                      f"scheduler CPU {r['sched_cpu_ms']:.3f} ms/launch; "
                      f"ITL p50 {r['itl_p50_ms']:.2f} ms; TTFT p50 / max {r['ttft_p50_ms']:.0f} / {r['ttft_max_ms']:.0f} ms (all sent by {r['sent_ms']:.0f} ms); errors {len(r['errors'])}; CPU s "
                      + ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_s"].items()) + f" in {r['wall_s']:.2f} s; load {r['load']:.1f}",
                      flush=True)
            reps.sort(key=lambda r: r["ratio"])
            med = dict(reps[len(reps) // 2])
            med["ratios"] = [r["ratio"] for r in reps]
            med["idle_list"] = sorted(r["cp"]["idle_ms"] for r in reps)
            med["added_list"] = sorted(r["added_ms"] for r in reps)
            rows.append(med)
    return rows


# ---- admission: main-process CPU per request -------------------------------------------------------


ADMISSION_KINDS = ("generate-ids", "generate-text", "completions", "chat")


def admission_request(kind: str, i: int, rng: random.Random, prompt_len: int) -> tuple[str, dict]:
    """(path, body) of one streaming request with one output token."""
    words = " ".join(f"w{rng.randrange(1000)}" for _ in range(max(1, prompt_len // 2)))
    if kind == "generate-ids":
        return "/generate", {"input_ids": [rng.randrange(TOKEN_LO, TOKEN_HI) for _ in range(prompt_len)],
                             "stream": True, "sampling_params": {"max_new_tokens": 1, "ignore_eos": True}}
    if kind == "generate-text":
        return "/generate", {"text": f"Request {i}: {words}", "stream": True,
                             "sampling_params": {"max_new_tokens": 1, "ignore_eos": True}}
    if kind == "completions":
        return "/v1/completions", {"prompt": f"Request {i}: {words}", "stream": True, "max_tokens": 1,
                                   "ignore_eos": True}
    if kind == "chat":
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": f"Request {i}: {words}"}],
                                        "stream": True, "max_tokens": 1, "ignore_eos": True}
    raise ValueError(f"unknown admission kind {kind!r}")


async def admission_burst(host: str, port: int, reqs: list[tuple[str, dict]]) -> list[str]:
    """Send every request at once, each on its own connection; return the errors."""
    import orjson

    async def one(path: str, body: dict) -> str:
        data = orjson.dumps(body)
        r, w = await asyncio.open_connection(host, port)
        w.write((f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n").encode() + data)
        got = b""
        while _DONE not in got:
            chunk = await r.read(65536)
            if not chunk:
                break
            got += chunk
        w.close()
        return "" if got.startswith(b"HTTP/1.1 200") and _DONE in got else got[:300].decode(errors="replace")

    return [e for e in await asyncio.gather(*(one(p, b) for p, b in reqs)) if e]


def admission(a) -> list[dict]:
    """Main-process (and every other process's) CPU ms per request, per kind and burst size."""
    levels = [int(x) for x in a.streams.split(",")]
    work = tempfile.mkdtemp(prefix="host-overhead-")
    rows = []
    with ServerProcess(server_flags(a, max(levels)), os.path.join(work, "server.log"), env=a.env).start() as srv:
        host, port = srv.base_url.rsplit("//", 1)[1].rsplit(":", 1)
        pids = dict(server_pids(srv.proc.pid), client=os.getpid())
        rng = random.Random(a.seed)
        for kind in ADMISSION_KINDS:
            asyncio.run(admission_burst(host, int(port), [admission_request(kind, i, rng, a.prompt_len)
                                                         for i in range(8)]))  # warm-up
            for n in levels:
                reps = []
                for _ in range(a.repeats):
                    reqs = [admission_request(kind, i, rng, a.prompt_len) for i in range(n)]
                    cpu0, load0, t0 = process_cpu(pids), load_average(), time.perf_counter()
                    errors = asyncio.run(admission_burst(host, int(port), reqs))
                    wall = time.perf_counter() - t0
                    cpu1 = process_cpu(pids)
                    if errors:
                        raise RuntimeError(f"{kind}: {len(errors)} of {n} requests failed: {errors[0]}")
                    reps.append({"kind": kind, "streams": n, "wall_s": wall, "load": (load0 + load_average()) / 2,
                                 **{k: (cpu1[k] - cpu0[k]) / n * 1e3 for k in pids}})
                reps.sort(key=lambda r: r["main"])
                row = dict(reps[len(reps) // 2])
                row["main_runs"] = [r["main"] for r in reps]
                rows.append(row)
                print(f"{kind} x{n}: main CPU {row['main']:.3f} ms/request (runs "
                      + ", ".join(f"{x:.3f}" for x in row["main_runs"]) + f"), scheduler {row.get('scheduler', 0):.3f}, "
                      f"detokenizer {row.get('detokenizer', 0):.3f}, client {row['client']:.3f}; "
                      f"wall {row['wall_s']:.2f} s; load {row['load']:.1f}", flush=True)
    return rows


def admission_table(rows: list[dict]) -> list[str]:
    lines = ["| request | burst | main CPU ms/request (runs) | scheduler | detokenizer | client | burst wall s | load |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        runs = ", ".join(f"{x:.3f}" for x in r["main_runs"])
        lines.append(f"| {r['kind']} | {r['streams']} | **{r['main']:.3f}** ({runs}) | {r.get('scheduler', float('nan')):.3f} "
                     f"| {r.get('detokenizer', float('nan')):.3f} | {r['client']:.3f} | {r['wall_s']:.2f} | {r['load']:.1f} |")
    return lines


def table(rows: list[dict], a) -> list[str]:
    lines = ["| streams | tokens | device limit tok/s | delivered tok/s | ratio (runs) | launches / min | device busy "
             "| device idle ms/launch (runs) | host gaps: count, mean ms, its CPU ms | scheduler CPU ms/launch "
             "| ITL p50 / p99 (ms) | added per token p50 (ms) | /health p50 / max (ms) "
             "| CPU us/token: main / sched / detok / client | load |",
             "|---:|---:|---:|---:|---|---:|---:|---|---|---:|---|---:|---|---|---:|"]
    for r in rows:
        cp = r["cp"]
        runs = ", ".join(f"{x:.1%}" for x in r["ratios"])
        idles = ", ".join(f"{x:.3f}" for x in r["idle_list"])
        cpu = " / ".join(f"{r['cpu_s'].get(k, float('nan')) / max(r['tokens'], 1) * 1e6:.1f}"
                         for k in ("main", "scheduler", "detokenizer", "client"))
        lines.append(f"| {r['streams']} | {r['tokens']} | {r['limit_tok_s']:.0f} | {r['tok_s']:.0f} "
                     f"| **{r['ratio']:.1%}** ({runs}) | {r['launches']} / {r['min_steps']} | {r['busy']:.1%} "
                     f"| **{cp['idle_ms']:.3f}** ({idles}) | {cp['gaps']}, {cp['mean_ms']:.3f}, {cp['cpu_ms']:.3f} "
                     f"| {r['sched_cpu_ms']:.3f} "
                     f"| {r['itl_p50_ms']:.2f} / {r['itl_p99_ms']:.2f} | {r['added_ms']:.2f} "
                     f"| {r['health_p50_ms']:.1f} / {r['health_max_ms']:.1f} | {cpu} "
                     f"| {r['load']:.1f} |")
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", default="1,64,256,1024")
    ap.add_argument("--step-ms", type=float, default=10.0)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--stream-interval", type=int, default=1)
    ap.add_argument("--client-loop", choices=("uvloop", "asyncio"), default="uvloop",
                    help="the clients' event loop (before 2026-11-30's fifth pass: asyncio)")
    ap.add_argument("--policy", default="aggregated")
    ap.add_argument("--chunk", type=int, default=8192, help="--chunked-prefill-size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-arg", action="append", default=[], help="extra server flag (repeatable)")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--title", default="")
    ap.add_argument("--cpu-per-step", action="store_true",
                    help="instead of the server: CPU time per decode step of the scheduler's and the detokenizer's "
                         "work, in this process, at each --streams batch (the median of --repeats runs)")
    ap.add_argument("--admission", action="store_true",
                    help="instead: CPU time per request of the main process (and the others) for bursts of --streams "
                         "streaming one-token requests (/generate with ids, with text, /v1/completions, "
                         "/v1/chat/completions)")
    a = ap.parse_args(argv)
    a.env = {"OMP_NUM_THREADS": "1"}
    if a.admission:
        rows = admission(a)
        lines = admission_table(rows)
    elif a.cpu_per_step:
        rows = []
        for n in (int(x) for x in a.streams.split(",")):
            reps = sorted((step_cpu(n, a) for _ in range(a.repeats)), key=lambda r: r["scheduler"])
            rows.append(reps[len(reps) // 2])
            print(f"batch {n}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items() if isinstance(v, float)),
                  flush=True)
        lines = cpu_table(rows)
    else:
        rows = run(a)
        lines = table(rows, a)
    cmd = "python benchmark/host_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print("\n".join(lines))
    if a.out:
        append_result_section(a.out, a.title or "host overhead", cmd, lines)
    return rows


if __name__ == "__main__":
    main()

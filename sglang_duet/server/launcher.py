"""Start the three processes, supervise them, serve HTTP, and stop cleanly.

Startup: the scheduler (loads the model) and the detokenizer (imports transformers meanwhile) are
spawned together; each reports readiness or its startup error over a pipe. Meanwhile this process
imports its HTTP stack on a thread (`_warm_imports`: seconds of imports that would otherwise run only
after the children are ready). Then uvicorn serves and a warm-up request goes through the whole path
before /health turns 200 and "ready" is logged, with the start-up's phases (`startup_phases.Phases`).
A child that dies later fails the in-flight requests, turns /health to 503 and ends the server with
a non-zero exit code. SIGTERM/SIGINT drain: the listening socket closes and /health turns 503 at
once, in-flight requests may finish for `--shutdown-grace-s`, then whatever still runs ends with a
503 error; then the children stop and the socket dir is removed.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import urllib.request
from multiprocessing.connection import wait as mp_wait

import msgspec

from sglang_duet.server.cpu_threads import pin_process, plan_for_server, start_process_with_env
from sglang_duet.server.hooks import ServerHooks
from sglang_duet.server.ipc import IPCPaths, recv_ready, spawn_context, tune_gc
from sglang_duet.server_args import ServerArgs, fill_resolved_policy
from sglang_duet.startup_phases import Phases

logger = logging.getLogger("sglang_duet.server")

WARMUP_TIMEOUT_S = 600
# After the grace period the remaining requests are failed, which ends their handlers within
# milliseconds; uvicorn's own (task-cancelling) timeout is only the backstop behind that.
SHUTDOWN_BACKSTOP_S = 3.0


class StartupError(RuntimeError):
    pass


class _Stop(BaseException):
    """Raised by our signal handler outside uvicorn's lifetime (e.g. during model loading)."""


def _on_signal(sig, _frame):
    # One stop is enough: a second signal (e.g. from a wrapper like `timeout` forwarding its own)
    # must not interrupt the clean-up the first one started.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise _Stop(sig)


def launch_server(args: ServerArgs, hooks: ServerHooks | None = None) -> int:
    """Run the server until stopped; returns the process exit code. `hooks`: what the entrypoint
    plugs in (a scheduler class, the tokenizer manager's backend, extra routes); see server/hooks.py."""
    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s] %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if args.node_rank > 0:  # SGLang's layout: only node 0 serves HTTP; other nodes run follower ranks
        from sglang_duet.distributed.tp_worker import run_node_followers

        try:
            return run_node_followers(args)
        except _Stop:
            return 0
    server = Launcher(args, hooks)
    try:
        server.start_children()
        return server.serve()
    except StartupError as e:
        logger.error("%s", e)
        return 1
    except _Stop:
        logger.info("stopped")
        return 0 if server.exit_code is None else server.exit_code
    finally:
        server.stop_children()


class Launcher:
    def __init__(self, args: ServerArgs, hooks: ServerHooks | None = None):
        self.args = args
        self.hooks = hooks or ServerHooks()
        self.paths = IPCPaths.create()
        self.procs: dict = {}
        self.exit_code: int | None = None
        self.tm = None
        self.uvicorn = None
        self.phases = Phases()  # start-up, logged when ready
        self.cpu_plan = None  # server/cpu_threads.py
        self._warm: threading.Thread | None = None  # _warm_imports, started with the children
        self._warmed: dict[str, object] = {}  # its tokenizer, by folder: the tokenizer manager's, loaded once

    # ---- children ----------------------------------------------------------------------------

    def start_children(self) -> None:
        from sglang_duet.server.detokenizer_proc import run_detokenizer_process
        from sglang_duet.server.scheduler_proc import run_scheduler_process

        ctx = spawn_context()
        s_parent, s_child = ctx.Pipe()
        d_parent, d_child = ctx.Pipe()
        args_bytes = msgspec.msgpack.encode(self.args)  # no pickled objects cross the process boundary
        self.procs["scheduler"] = ctx.Process(target=run_scheduler_process, name="sglang-duet-scheduler",
                                              args=(args_bytes, self.paths, s_child, self.hooks.scheduler_class),
                                              # a daemonic process may not start children: the
                                              # tensor-parallel follower ranks (stop_children ends it)
                                              daemon=self.args.tp_size == 1)
        self.procs["detokenizer"] = ctx.Process(target=run_detokenizer_process, name="sglang-duet-detokenizer",
                                                args=(self.args.log_level, self.paths, d_child), daemon=True)
        self.cpu_plan = plan_for_server(self.args)  # threads now, CPU sets once ready (_pin_processes)
        start_process_with_env(self.procs["scheduler"], self.cpu_plan.model_env() if self.cpu_plan else {})
        self.procs["detokenizer"].start()
        s_child.close()
        d_child.close()
        self.phases.mark("spawn children")
        early_tokenizer = tokenizer_folder_known_early(self.args)
        if early_tokenizer:  # the detokenizer loads it while the scheduler loads the model
            d_parent.send_bytes(early_tokenizer.encode())
        self._warm = threading.Thread(target=_warm_imports, args=(early_tokenizer, self._warmed), name="warm-imports",
                                      daemon=True)
        self._warm.start()
        info = self._wait_ready("scheduler", s_parent)
        self.phases.mark("scheduler ready (model loaded)")
        if not early_tokenizer:
            d_parent.send_bytes((info.tokenizer_dir or "").encode())
        self._wait_ready("detokenizer", d_parent)
        self.phases.mark("detokenizer ready")
        self.info = info
        fill_resolved_policy(self.args, info.policy)  # /get_server_info: what runs, not "unset"
        logger.info("model %s loaded: context %d, %d KV slots, policy %s", info.model_name or info.model_path,
                    info.context_length, info.kv_slots, info.policy.get("name"))

    def _wait_ready(self, name: str, conn):
        proc = self.procs[name]
        mp_wait([conn, proc.sentinel])
        try:
            info = recv_ready(conn) if conn.poll() else None
        except EOFError:
            info = None
        if info is None:
            proc.join(1)
            raise StartupError(f"The {name} process exited during startup (exit code {proc.exitcode}).")
        if info.status != "ready":
            raise StartupError(f"The {name} process failed to start: {info.error}")
        conn.close()
        return info

    def stop_children(self) -> None:
        for p in self.procs.values():
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + 5
        for p in self.procs.values():
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1)
        if self.tm is not None:
            with contextlib.suppress(Exception):
                self.tm.close()
        self.paths.cleanup()

    # ---- HTTP --------------------------------------------------------------------------------

    def serve(self) -> int:
        import uvicorn

        from sglang_duet.server.http_server import create_app
        from sglang_duet.server.scheduler_backend import ZmqSchedulerBackend
        from sglang_duet.server.tokenizer_manager import TokenizerManager

        self.phases.mark("HTTP stack imported")
        backend = (self.hooks.scheduler_backend or ZmqSchedulerBackend)(self.paths)
        tokenizer = None
        if self._warm is not None and self.info.tokenizer_dir:
            self._warm.join()  # it is loading this tokenizer already: waiting costs less than loading it again
            tokenizer = self._warmed.get(os.path.realpath(self.info.tokenizer_dir))
        self.tm = TokenizerManager(self.args, self.info, backend, tokenizer=tokenizer)
        self.phases.mark("tokenizer manager")

        @contextlib.asynccontextmanager
        async def lifespan(_app):
            self.tm.start()
            loop = asyncio.get_running_loop()
            for name, p in self.procs.items():
                loop.add_reader(p.sentinel, self._child_died, name, p)
            threading.Thread(target=self._warmup, name="warmup", daemon=True).start()
            self.tm.last_heard = time.monotonic()
            loop.call_later(self._watchdog_period(), self._watchdog)
            tune_gc()
            yield
            for p in self.procs.values():
                with contextlib.suppress(Exception):
                    loop.remove_reader(p.sentinel)

        app = create_app(self.tm, self.args, lifespan=lifespan)
        for add_routes in self.hooks.add_routes:
            add_routes(app, self.tm, self.args)
        level = self.args.log_level.lower()
        grace = self.args.shutdown_grace_s
        config = uvicorn.Config(app, host=self.args.host, port=self.args.port, loop="uvloop", http=_http_impl(),
                                log_level=level, access_log=level == "debug",
                                timeout_graceful_shutdown=grace + SHUTDOWN_BACKSTOP_S, timeout_keep_alive=30)
        self.uvicorn = _draining_server_class()(config, self.tm, grace)
        self.uvicorn.run()
        if self.exit_code is None and not self.uvicorn.started:
            self.exit_code = 1  # e.g. the port is taken: uvicorn logged why
        return self.exit_code or 0

    def _pin_processes(self) -> None:
        """The CPU plan's sets (server/cpu_threads.py): the model process on its CPUs, this process and the
        detokenizer on the others. After start-up, which runs faster with every process on every CPU."""
        plan = self.cpu_plan
        if plan is None:
            return
        if plan.pinned:
            try:
                pin_process(self.procs["scheduler"].pid, plan.model_cpus)
                pin_process(self.procs["detokenizer"].pid, plan.other_cpus)
                pin_process(0, plan.other_cpus)  # HTTP and tokenization, beside the detokenizer
            except OSError as e:  # e.g. a container that forbids it: serve unpinned
                logger.warning("could not pin the processes to their CPUs (%s); they run unpinned", e)
                return
        logger.info("CPU threads: %s", plan.describe())

    def _child_died(self, name: str, proc) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(proc.sentinel)
        proc.join(0.1)
        msg = f"The {name} process died unexpectedly (exit code {proc.exitcode}); the server is shutting down."
        logger.error(msg)
        self.tm.fail_all(msg)
        self.exit_code = 1
        # Give the failed requests a moment to send their error responses, then stop.
        loop.call_later(0.5, self._request_exit)

    def _watchdog_period(self) -> float:
        return min(5.0, self.args.watchdog_timeout / 4)

    def _watchdog(self) -> None:
        """A scheduler that is alive but silent (its loop stuck) is as dead as one that exited: the
        scheduler reports stats every STATS_INTERVAL_S, so --watchdog-timeout without a word means hung."""
        if self.tm.dead or (self.uvicorn is not None and self.uvicorn.should_exit):
            return
        silent = time.monotonic() - self.tm.last_heard
        timeout = self.args.watchdog_timeout
        if silent > timeout:
            msg = (f"The scheduler is alive but has sent nothing for {silent:.1f} s (--watchdog-timeout {timeout:g}): "
                   f"it is hung; the server is shutting down.")
            logger.error(msg)
            self.tm.fail_all(msg)
            self.exit_code = 1
            asyncio.get_running_loop().call_later(0.5, self._request_exit)
            return
        asyncio.get_running_loop().call_later(self._watchdog_period(), self._watchdog)

    def _request_exit(self) -> None:
        if self.uvicorn is not None:
            self.uvicorn.should_exit = True

    def _warmup(self) -> None:
        """Send one small request through HTTP -> scheduler -> detokenizer -> HTTP, then report ready."""
        a = self.args
        host = "127.0.0.1" if a.host in ("0.0.0.0", "", "::") else a.host
        url = f"http://{host}:{a.port}"
        while not self.uvicorn.started:
            if self.uvicorn.should_exit:
                return
            time.sleep(0.01)
        self.phases.mark("HTTP server up")
        if not a.skip_warmup:
            body = {"sampling_params": {"max_new_tokens": 2, "temperature": 0.0, "ignore_eos": True}}
            if self.tm.tokenizer is not None:
                body["text"] = "The capital city of France is"
            else:
                body["input_ids"] = [1, 2, 3]
            req = urllib.request.Request(f"{url}/generate", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            if a.api_key:
                req.add_header("Authorization", f"Bearer {a.api_key}")
            try:
                with urllib.request.urlopen(req, timeout=WARMUP_TIMEOUT_S) as r:
                    r.read()
            except Exception as e:  # noqa: BLE001
                logger.error("warm-up request failed: %s; shutting down", e)
                self.exit_code = 1
                self.uvicorn.should_exit = True
                return
        self.phases.mark("warm-up request")
        self._pin_processes()
        self.tm.ready = True
        logger.info("start-up: %s", self.phases.summary())
        logger.info("The server is ready at %s (policy %s)", url, self.info.policy.get("name"))
        print(f"sglang-duet ready: {url}", file=sys.stderr, flush=True)


def tokenizer_folder_known_early(args: ServerArgs) -> str | None:
    """A folder holding the tokenizer the scheduler will hand the other processes, where it exists before
    the model loads: the embedded model's tokenizer copy (model_loader/tokenizer_cache.py),
    written by an earlier start with the same save_pretrained the scheduler uses for its hand-over copy.
    The detokenizer then loads it at once instead of after the model. None: wait for the scheduler."""
    if args.executor != "model" or args.tokenizer_path or args.load_format not in ("auto", "safetensors"):
        return None
    from sglang_duet.model_loader.embedded import default_model_path, is_embedded_folder
    from sglang_duet.model_loader.tokenizer_cache import tokenizer_copy_dir

    folder = args.model_path
    if folder is None:
        try:
            folder = default_model_path(convert=False)  # converting is the scheduler's job
        except (OSError, ValueError):
            return None
    if not is_embedded_folder(folder):
        return None
    copy = tokenizer_copy_dir(folder)
    return copy if os.path.isfile(os.path.join(copy, "tokenizer.json")) else None


def _warm_imports(tokenizer_folder: str | None, loaded: dict) -> None:
    """While the children start: import what serve() needs (uvicorn, the app, the tokenizer manager)
    and, where its folder is known, load the model's tokenizer (`load_saved_tokenizer`) into `loaded`
    by real path; serve() hands it to the tokenizer manager when the scheduler names that folder.
    Only a head start: anything that fails here is done again, and reported, by serve()."""
    try:
        import uvicorn  # noqa: F401

        from sglang_duet.server import http_server, scheduler_backend, tokenizer_manager  # noqa: F401
        if tokenizer_folder:
            from sglang_duet.model_loader.tokenizer_cache import load_saved_tokenizer

            loaded[os.path.realpath(tokenizer_folder)] = load_saved_tokenizer(tokenizer_folder)
    except Exception as e:  # noqa: BLE001
        logger.debug("start-up import warm-up: %s", e)


def _http_impl() -> str:
    """uvicorn's C HTTP parser (httptools, a dependency): per SSE event it costs a fraction of the
    pure-Python h11's time, which at hundreds of streams was most of the main process's."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        logger.warning("httptools is not installed; serving HTTP with the slower h11 (pip install httptools)")
        return "h11"
    return "httptools"


def _draining_server_class():
    import uvicorn  # imported late, as in serve(): the children never need it

    class DrainingServer(uvicorn.Server):
        """uvicorn's shutdown (stop listening, wait for connections) plus our drain: /health and new
        requests get 503 at once, and requests still running after the grace period get an error."""

        def __init__(self, config, tm, grace_s: float):
            super().__init__(config)
            self.tm = tm
            self.grace_s = grace_s

        def handle_exit(self, sig, frame) -> None:
            # Refuse new work from the signal on: uvicorn's loop only notices should_exit on its next
            # tick (up to 0.1 s later), and /health must not say 200 meanwhile.
            if not self.tm.dead:
                self.tm.start_draining()
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None) -> None:
            if not self.tm.dead:
                n = sum(not st.finished for st in self.tm.states.values())
                logger.info("shutting down: %d request(s) in flight, %.1f s grace", n, self.grace_s)
                self.tm.start_draining()
                asyncio.get_running_loop().call_later(self.grace_s, self._grace_over)
            await super().shutdown(sockets)

        def _grace_over(self) -> None:
            n = sum(not st.finished for st in self.tm.states.values())
            if n:
                logger.warning("shutdown grace period over: failing %d in-flight request(s)", n)
                self.tm.fail_all("The server is shutting down.", dead=False)

    return DrainingServer

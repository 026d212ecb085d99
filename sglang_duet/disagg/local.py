"""`launch_server --disaggregation-mode pd-local`: one prefill instance, one decode instance and a
router, on one machine, from one command.

The instances are ordinary `launch_server` processes with every other flag as given (model, policy,
KV size, ...) on free ports of 127.0.0.1; the router serves on --host/--port. The router is
sglang-router in PD mode (`--pd-local-router sglang`, the default where it is installed) or this
project's (`builtin`: retries with the same KV, decode chosen by free KV, /disagg/instances). Stopping pd-local
(SIGTERM/SIGINT) stops everything; if it dies, its children get SIGTERM from the kernel.
"""
from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import MISSING, fields

from sglang_duet.server_args import DEFAULT_BOOTSTRAP_PORT, ServerArgs

logger = logging.getLogger("sglang_duet.router")

_NOT_PASSED = {"port", "host", "disaggregation_mode", "disaggregation_bootstrap_port", "pd_local_router", "extra"}
POLL_S = 0.5  # sglang-router mode: how often the children are checked


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def instance_argv(args: ServerArgs) -> list[str]:
    """The flags both instances get: `args` as given, except that `--cpu-bind auto` becomes off. Each
    instance would plan its CPUs as if it had the machine to itself (server/cpu_threads.py) and both
    would pin their model threads to the same CPUs; CPU lists given by the user are passed on."""
    argv = args_to_argv(args)
    if args.cpu_bind == "auto":
        argv += ["--cpu-bind", "off"]
    return argv


def args_to_argv(args: ServerArgs) -> list[str]:
    """The flags that reproduce `args` (those that differ from the defaults), for a child launch_server."""
    out = []
    for f in fields(ServerArgs):
        if f.name in _NOT_PASSED:
            continue
        v = getattr(args, f.name)
        default = f.default if f.default is not MISSING else None
        if v == default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            if v:
                out.append(flag)
        elif v is not None:
            out += [flag, str(v)]
    return out


def shown(cmd: list[str]) -> str:
    """A command line for the log, the API key's value hidden."""
    return " ".join("***" if i and cmd[i - 1] == "--api-key" else a for i, a in enumerate(cmd))


def _die_with_parent() -> None:
    try:  # Linux: SIGTERM when the router process dies, however it dies
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def router_kind(args: ServerArgs) -> str:
    """sglang or builtin; a CLI-style error for what cannot be."""
    kind = args.pd_local_router
    has_sglang = importlib.util.find_spec("sglang_router") is not None
    if kind == "auto":
        kind = "sglang" if has_sglang else "builtin"
    if kind == "sglang" and not has_sglang:
        raise SystemExit("--pd-local-router sglang: sglang-router is not installed (pip install sglang-router)")
    return kind


def bootstrap_port(args: ServerArgs) -> int:
    """The prefill's bootstrap port. pd-local tells its own router, so it takes a free one (two
    pd-locals, or a prefill instance on SGLang's 8998, must not collide) unless another was asked for."""
    given = args.disaggregation_bootstrap_port
    return given if given not in (0, DEFAULT_BOOTSTRAP_PORT) else free_port()


def run_pd_local(args: ServerArgs) -> int:
    from sglang_duet.router import make_parser, run_router

    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s pd-local] %(levelname)s %(message)s")
    kind = router_kind(args)
    base = instance_argv(args)
    ports = {"prefill": free_port(), "decode": free_port()}
    bootstrap = bootstrap_port(args)
    procs: dict[str, subprocess.Popen] = {}

    def stop_children() -> None:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def on_signal(sig, _frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    try:
        for role, port in ports.items():
            cmd = [sys.executable, "-m", "sglang_duet.launch_server", *base, "--disaggregation-mode", role,
                   "--host", "127.0.0.1", "--port", str(port)]
            if role == "prefill":
                cmd += ["--disaggregation-bootstrap-port", str(bootstrap)]
            logger.info("starting the %s instance: %s", role, shown(cmd[1:]))
            procs[role] = subprocess.Popen(cmd, preexec_fn=_die_with_parent, env=dict(os.environ))

        def alive() -> str | None:
            for role, p in procs.items():
                if p.poll() is not None:
                    return f"the {role} instance exited with code {p.returncode} during startup"
            return None

        if kind == "sglang":
            return _run_sglang_router(args, ports, bootstrap, procs, alive)
        argv = ["--prefill", f"http://127.0.0.1:{ports['prefill']}", "--decode", f"http://127.0.0.1:{ports['decode']}",
                "--host", args.host, "--port", str(args.port), "--log-level", args.log_level]
        if args.api_key:
            argv += ["--api-key", args.api_key, "--instance-api-key", args.api_key]
        if args.served_model_name:
            argv += ["--served-model-name", args.served_model_name]
        return run_router(make_parser().parse_args(argv), alive=alive)
    finally:
        stop_children()


def _run_sglang_router(args: ServerArgs, ports: dict, bootstrap: int, procs: dict, alive) -> int:
    """sglang_router.launch_router --pd-disaggregation in front of the two instances, until one of
    them or the router ends (the caller stops the instances)."""
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation",
           "--prefill", f"http://127.0.0.1:{ports['prefill']}", str(bootstrap),
           "--decode", f"http://127.0.0.1:{ports['decode']}", "--host", args.host, "--port", str(args.port),
           "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
           "--log-level", {"warning": "warn", "critical": "error"}.get(args.log_level, args.log_level)]
    if args.api_key:  # sglang-router then asks clients for it and sends it on to both instances
        cmd += ["--api-key", args.api_key]
    logger.info("starting sglang-router: %s", shown(cmd[1:]))
    procs["router"] = router = subprocess.Popen(cmd, preexec_fn=_die_with_parent, env=dict(os.environ))
    while True:
        if router.poll() is not None:
            return router.returncode
        problem = alive()
        if problem:
            logger.error("%s; stopping", problem.replace("during startup", ""))
            return 1
        time.sleep(POLL_S)

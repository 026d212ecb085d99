"""`launch_server --disaggregation-mode pd-local`: one prefill instance, one decode instance and the
router, on one machine, from one command.

The instances are ordinary `launch_server` processes with every other flag as given (model, policy,
KV size, ...) on free ports of 127.0.0.1; the router serves on --host/--port. Stopping the router
(SIGTERM/SIGINT) stops both instances; if the router dies, they get SIGTERM from the kernel.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import MISSING, fields

from sglang_duet.server_args import ServerArgs

logger = logging.getLogger("sglang_duet.router")

_NOT_PASSED = {"port", "host", "disaggregation_mode", "extra"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _die_with_parent() -> None:
    try:  # Linux: SIGTERM when the router process dies, however it dies
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def run_pd_local(args: ServerArgs) -> int:
    from sglang_duet.router import make_parser, run_router

    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s pd-local] %(levelname)s %(message)s")
    base = args_to_argv(args)
    ports = {"prefill": free_port(), "decode": free_port()}
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
            logger.info("starting the %s instance: %s", role, " ".join(cmd[1:]))
            procs[role] = subprocess.Popen(cmd, preexec_fn=_die_with_parent, env=dict(os.environ))

        def alive() -> str | None:
            for role, p in procs.items():
                if p.poll() is not None:
                    return f"the {role} instance exited with code {p.returncode} during startup"
            return None

        argv = ["--prefill", f"http://127.0.0.1:{ports['prefill']}", "--decode", f"http://127.0.0.1:{ports['decode']}",
                "--host", args.host, "--port", str(args.port), "--log-level", args.log_level]
        if args.api_key:
            argv += ["--api-key", args.api_key, "--instance-api-key", args.api_key]
        if args.served_model_name:
            argv += ["--served-model-name", args.served_model_name]
        return run_router(make_parser().parse_args(argv), alive=alive)
    finally:
        stop_children()

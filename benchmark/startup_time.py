"""How long `python -m sglang_duet.launch_server` takes until /health is 200, and on what.

Each round starts the server (in its own session), polls /health every 20 ms, reads the launcher's
"start-up:" line (its phases, server/launcher.py) and the scheduler's "model loaded:" line (the
loader's phases), stops it, and takes the CPU seconds the whole process tree used (the children's
rusage; the server reaps its own children), and, at ready, each server process's own (/proc: main,
then its spawned children in start order, scheduler and detokenizer). With --before DIR, the rounds alternate between this
checkout and another one (e.g. a `git worktree` of an older commit): `python -m` runs the package
of the working directory. The load average is printed with every round: on a shared machine wall
time is only comparable between adjacent rounds, CPU seconds less so.

    python -m benchmark.startup_time --rounds 3 [--before /tmp/old] [-- --enable-torch-compile]
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
import urllib.request

from benchmark.server_process import free_port

_STARTUP = re.compile(r"start-up: (.*)\(total")
_LOADED = re.compile(r"model loaded: (.*)\(total")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()  # fields from the 3rd (state) on


def _proc_cpu(pid: int) -> float:
    """user+system CPU seconds of a live process (/proc/PID/stat)."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _spawned_children(pid: int) -> list[int]:
    """The process's multiprocessing children (not its resource tracker), oldest first."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        return []
    spawned = []
    for k in kids:
        try:
            with open(f"/proc/{k}/cmdline") as f:
                if "multiprocessing.spawn" in f.read():
                    spawned.append((int(_stat(k)[19]), k))  # start time, in clock ticks after boot
        except (OSError, IndexError, ValueError):
            pass
    return [k for _, k in sorted(spawned)]


# The launcher starts the scheduler, then the detokenizer (server/launcher.py start_children).
_CHILD_ROLES = ("scheduler", "detokenizer")


def per_process_cpu(pid: int) -> dict[str, float]:
    """CPU seconds each of the server's processes has used so far, by role (while they run)."""
    out = {"main": _proc_cpu(pid)}
    for i, child in enumerate(_spawned_children(pid)):
        try:
            out[_CHILD_ROLES[i] if i < len(_CHILD_ROLES) else f"child {i}"] = _proc_cpu(child)
        except OSError:
            pass
    return out


def one_start(cwd: str, flags: list[str], log_path: str, timeout_s: float = 300.0) -> dict:
    port = free_port()
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sglang_duet.launch_server", "--port", str(port), *flags],
                                cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    ready = None
    while time.perf_counter() - t0 < timeout_s and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    ready = time.perf_counter() - t0
                    break
        except OSError:
            pass
        time.sleep(0.02)
    load = os.getloadavg()[0]
    procs = {}
    if proc.poll() is None:
        try:
            procs = per_process_cpu(proc.pid)
        except OSError:
            pass
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = open(log_path, errors="replace").read()
    phases = _STARTUP.findall(text)
    loaded = _LOADED.findall(text)
    return {"ready_s": ready, "cpu_s": _children_cpu() - cpu0, "load1": load, "procs": procs,
            "phases": phases[-1].strip().rstrip(",") if phases else "",
            "loader": loaded[-1].strip().rstrip(",") if loaded else ""}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--before", help="another checkout to alternate with (its package runs from there)")
    p.add_argument("--log-dir", default="/tmp/startup_time")
    p.add_argument("flags", nargs="*", help="server flags (after --)")
    a = p.parse_args(argv)
    os.makedirs(a.log_dir, exist_ok=True)
    sides = [("after", os.getcwd())] + ([("before", os.path.abspath(a.before))] if a.before else [])
    results: dict[str, list[dict]] = {name: [] for name, _ in sides}
    for r in range(a.rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        for name, cwd in order:
            res = one_start(cwd, a.flags, os.path.join(a.log_dir, f"{name}-{r}.log"))
            results[name].append(res)
            ready = f"{res['ready_s']:.2f} s" if res["ready_s"] is not None else "NOT READY"
            print(f"round {r} {name:6s} ready {ready}  cpu {res['cpu_s']:.1f} s  load {res['load1']:.2f}", flush=True)
            if res["procs"]:
                print("    cpu s:    " + ", ".join(f"{k} {v:.1f}" for k, v in res["procs"].items()))
            if res["phases"]:
                print(f"    launcher: {res['phases']}")
            if res["loader"]:
                print(f"    loader:   {res['loader']}")
    for name, rs in results.items():
        ok = [x["ready_s"] for x in rs if x["ready_s"] is not None]
        if ok:
            print(f"{name}: ready median {statistics.median(ok):.2f} s (min {min(ok):.2f}, max {max(ok):.2f}), "
                  f"cpu median {statistics.median(x['cpu_s'] for x in rs):.1f} s, {len(ok)}/{len(rs)} started")
    return 0


if __name__ == "__main__":
    sys.exit(main())

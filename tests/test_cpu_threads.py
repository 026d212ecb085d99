"""Sizing and pinning the model process's CPU threads (issue 18): the pure rule over made-up CPU sets
and topologies, the CLI's errors, and a spawned child that runs where the plan says with the plan's
thread count."""
from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest

from sglang_duet.server.args import parse_args
from sglang_duet.server.cpu_threads import (CpuPlan, check_cpu_flags, parse_cpu_list, pin_process,
                                            plan_cpu_threads, plan_for_server, start_process_with_env)
from sglang_duet.server_args import ServerArgs

NO_ENV: dict = {}


def test_two_cpus_the_model_shares_the_others_cpu_with_its_second_thread():
    plan = plan_cpu_threads({0, 1}, env=NO_ENV)
    # thread 0 (Python's too) alone on CPU 1, thread 1 beside the main process and detokenizer on CPU 0
    assert plan == CpuPlan(threads=2, model_cpus=(1, 0), other_cpus=(0,), thread_cpus=(1, 0))
    assert plan.model_env() == {"OMP_NUM_THREADS": "2", "GOMP_CPU_AFFINITY": "1 0"}
    assert "pinned to 1,0;" in plan.describe()  # in thread order
    assert plan_cpu_threads({0, 1}, threads=1, env=NO_ENV).thread_cpus == (1,)  # --cpu-threads 1: the old split
    # two hyperthreads of one core: nothing to gain from sharing, the model keeps its one CPU
    one_core = plan_cpu_threads({0, 1}, core_of={0: (0, 0), 1: (0, 0)}, env=NO_ENV)
    assert one_core.model_cpus == (1,) and one_core.threads == 1
    # three CPUs leave the model two cores of its own: no sharing
    assert plan_cpu_threads({0, 1, 2}, env=NO_ENV).model_cpus == (1, 2)
    four = plan_cpu_threads(range(5), env=NO_ENV)
    assert four.model_env() == {"OMP_NUM_THREADS": "4", "GOMP_CPU_AFFINITY": "1 2 3 4"}


def test_the_allowed_set_is_respected_and_large_machines_leave_two_cpus():
    assert plan_cpu_threads({4, 5, 6, 7}, env=NO_ENV).model_cpus == (5, 6, 7)  # e.g. under taskset -c 4-7
    plan = plan_cpu_threads(range(16), env=NO_ENV)
    assert plan.other_cpus == (0, 1) and plan.model_cpus == tuple(range(2, 16)) and plan.threads == 14


def test_one_thread_per_physical_core():
    # 8 CPUs as 4 cores x 2 hyperthreads, Linux's usual numbering: cpu c and c+4 share core c % 4
    core_of = {c: (0, c % 4) for c in range(8)}
    plan = plan_cpu_threads(range(8), core_of=core_of, env=NO_ENV)
    assert plan.model_cpus == (1, 2, 3, 4, 5, 6, 7)
    # cores 1, 2, 3 and core 0 (through cpu 4; cpu 0 is the others') -> 4 threads, one per core
    assert plan.threads == 4 and plan.thread_cpus == (1, 2, 3, 4)
    more = plan_cpu_threads(range(8), threads=6, core_of=core_of, env=NO_ENV)  # explicit: hyperthreads too
    assert more.thread_cpus == (1, 2, 3, 4, 5, 6)


def test_off_one_cpu_and_the_environment():
    assert plan_cpu_threads({0, 1, 2, 3}, bind="off", env=NO_ENV) == CpuPlan(3, (), (), ())  # the old rule
    solo = plan_cpu_threads({3}, env=NO_ENV)
    assert solo.threads == 1 and not solo.pinned
    omp = plan_cpu_threads({0, 1, 2, 3}, env={"OMP_NUM_THREADS": "2"})
    assert omp.threads == 2 and omp.thread_cpus == (1, 2)
    assert plan_cpu_threads({0, 1, 2, 3}, threads=1, env={"OMP_NUM_THREADS": "2"}).threads == 1  # the flag wins
    user = plan_cpu_threads({0, 1, 2, 3}, env={"GOMP_CPU_AFFINITY": "3 2 1"})
    assert user.pinned and user.thread_cpus == () and "GOMP_CPU_AFFINITY" not in user.model_env()


def test_an_explicit_cpu_list():
    plan = plan_cpu_threads({0, 1, 2, 3, 4, 5}, bind="2-3,5", env=NO_ENV)
    assert plan.model_cpus == (2, 3, 5) and plan.other_cpus == (0, 1, 4) and plan.thread_cpus == (2, 3, 5)


def test_parse_cpu_list():
    assert parse_cpu_list("0-2, 5,5") == (0, 1, 2, 5)
    for bad in ("", "a", "3-1", "1,,2", "-1"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


@pytest.mark.parametrize("threads,bind,allowed,needle", [
    (0, "auto", {0, 1}, "--cpu-threads 0: must be at least 1"),
    (None, "9", {0, 1}, "--cpu-bind 9: CPU(s) 9 are not available"),
    (None, "0-1", {0, 1}, "leave at least one CPU"),
    (None, "one", {0, 1}, "--cpu-bind one: expected auto, off or a CPU list"),
    (3, "1", {0, 1, 2}, "--cpu-threads 3: more threads than the 1 CPU(s) of --cpu-bind 1"),
    (4, "auto", {0, 1}, "--cpu-threads 4: more threads than the 2 CPU(s) --cpu-bind auto gives"),
    (4, "auto", {0, 1, 2}, "--cpu-threads 4: more threads than the 2 CPU(s) --cpu-bind auto gives"),
])
def test_bad_flags_are_named(threads, bind, allowed, needle):
    assert needle in check_cpu_flags(threads, bind, allowed)


def test_good_flags_pass():
    assert check_cpu_flags(None, "auto", {0, 1}) is None
    assert check_cpu_flags(8, "off", {0, 1}) is None  # off: any count, placed by the OS
    assert check_cpu_flags(2, "1-2", {0, 1, 2}) is None


def test_the_cli_refuses_bad_values(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--cpu-bind", "0-9999"])
    assert "--cpu-bind 0-9999" in capsys.readouterr().err
    assert parse_args(["--cpu-bind", "off", "--cpu-threads", "1"]).cpu_bind == "off"


def test_no_plan_where_it_does_not_apply():
    assert plan_for_server(ServerArgs(executor="emulated")) is None
    assert plan_for_server(ServerArgs(tp_size=2)) is None
    assert plan_for_server(ServerArgs(device="cuda")) is None
    assert plan_for_server(ServerArgs(device="cpu")) is not None


def _report(go, q):
    import threading

    import torch

    torch.ones(64, 64) @ torch.ones(64, 64)  # torch's threads exist
    side = threading.Thread(target=go.get)  # a thread started before the pinning
    side.start()
    go.get()
    tasks = {int(t): sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}
    q.put((tasks, os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()))
    side.join(5)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_a_child_gets_the_plans_threads_and_then_every_thread_its_cpus():
    allowed = sorted(os.sched_getaffinity(0))
    plan = plan_cpu_threads(allowed, env=NO_ENV)
    ctx = mp.get_context("spawn")
    go, q = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_report, args=(go, q))
    env_before = dict(os.environ)
    start_process_with_env(child, plan.model_env())
    assert dict(os.environ) == env_before  # this process's environment is as it was
    time.sleep(0.5)
    deadline = time.monotonic() + 120
    while len(os.listdir(f"/proc/{child.pid}/task")) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)  # until its side thread runs
    moved = pin_process(child.pid, plan.model_cpus)
    if set(plan.model_cpus) != set(allowed):
        assert moved >= 2  # the main thread and the side thread at least
    go.put(None)
    go.put(None)
    tasks, omp, torch_threads = q.get(timeout=120)
    child.join(30)
    assert all(set(cpus) <= set(plan.model_cpus) for cpus in tasks.values()), tasks
    if plan.threads >= 2:  # GOMP_CPU_AFFINITY bound the main thread (torch's thread 0) to the plan's first CPU
        assert tasks[child.pid] == [plan.thread_cpus[0]], tasks
    else:
        assert all(cpus == list(plan.model_cpus) for cpus in tasks.values()), tasks
    assert omp == str(plan.threads) and torch_threads == plan.threads
    assert sorted(os.sched_getaffinity(0)) == allowed  # pinning the child moved nothing here


def test_pd_local_instances_are_not_both_pinned_to_the_same_cpus():
    """pd-local starts two servers on one machine: each would plan its CPUs as if alone and pin its
    model to the same ones, so `auto` becomes off for them; a CPU list the user gave is passed on."""
    from sglang_duet.disagg.local import instance_argv
    from sglang_duet.server_args import ServerArgs

    argv = instance_argv(ServerArgs())
    assert argv[argv.index("--cpu-bind") + 1] == "off" and argv.count("--cpu-bind") == 1
    argv = instance_argv(ServerArgs(cpu_bind="1"))
    assert argv[argv.index("--cpu-bind") + 1] == "1" and argv.count("--cpu-bind") == 1
    argv = instance_argv(ServerArgs(cpu_bind="off"))
    assert argv[argv.index("--cpu-bind") + 1] == "off" and argv.count("--cpu-bind") == 1

"""The executor side of the scheduler loop: submit launches, poll for finished ones."""
from __future__ import annotations

import abc

from sglang_duet.core.plan import Launch, LaunchResult


class Executor(abc.ABC):
    """Runs launches on lanes. It never decides what to run; the core and the policy do."""

    #: can run a prefill lane and a decode lane at the same time (split plans overlap)
    concurrent_lanes: bool = False
    #: runs a launch submitted while its lane is busy after that one, resolving its FUTURE_TOKEN
    #: inputs from it (overlap scheduling; see SchedulerCore's CoreConfig.overlap)
    supports_overlap: bool = False

    @abc.abstractmethod
    def submit(self, launch: Launch) -> None: ...

    @abc.abstractmethod
    def poll(self, timeout: float | None = None) -> list[LaunchResult]:
        """Results of finished launches; waits up to `timeout` seconds (None: until one finishes)."""

    def busy(self) -> bool:
        """Whether a launch is running or a result is waiting to be polled."""
        return False

    def shutdown(self) -> None:
        pass

"""What a layer above the server may plug into it, passed in by the entrypoint (never imported here).

The server layer knows nothing of disaggregation (or any other extension): the top-level launcher
(`sglang_duet/launch_server.py`) builds a `ServerHooks` and hands it to `launch_server`, so
`server/` imports no module above it and the layers point one way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class ServerHooks:
    # The scheduler process's class (a SchedulerProcess subclass); None: the ordinary one. It goes
    # to the spawned scheduler process by reference (module + name), so it must be a module-level class.
    scheduler_class: type | None = None
    # Builds the tokenizer manager's SchedulerBackend from the IPC paths (server/scheduler_backend.py);
    # None: the ordinary ZmqSchedulerBackend. An instance's sends its own message kinds to its scheduler.
    scheduler_backend: Callable | None = None
    # Called as add_routes(app, tokenizer_manager, server_args) after the ordinary routes exist.
    add_routes: tuple[Callable, ...] = field(default_factory=tuple)

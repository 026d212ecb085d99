"""What a prefill or decode instance plugs into the ordinary server (see server/hooks.py).

The entrypoint (`sglang_duet/launch_server.py`) asks for these and passes them to the server, so
the server layer never imports this package.
"""
from __future__ import annotations

from sglang_duet.server.hooks import ServerHooks


def instance_hooks(mode: str) -> ServerHooks:
    """The scheduler class, the tokenizer manager's backend and the /disagg/* routes of a
    `--disaggregation-mode prefill|decode` instance."""
    from sglang_duet.disagg.decode_scheduler import DecodeScheduler
    from sglang_duet.disagg.instance_api import add_instance_routes
    from sglang_duet.disagg.instance_backend import InstanceBackend
    from sglang_duet.disagg.prefill_scheduler import PrefillScheduler

    schedulers = {"prefill": PrefillScheduler, "decode": DecodeScheduler}
    if mode not in schedulers:
        raise ValueError(f"--disaggregation-mode {mode!r}: the scheduler runs prefill or decode instances")
    return ServerHooks(scheduler_class=schedulers[mode], scheduler_backend=InstanceBackend,
                       add_routes=(add_instance_routes,))

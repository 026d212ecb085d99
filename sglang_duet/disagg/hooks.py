"""What a prefill or decode instance plugs into the ordinary server (see server/hooks.py).

The entrypoint (`sglang_duet/launch_server.py`) asks for these and passes them to the server, so
the server layer never imports this package.
"""
from __future__ import annotations

from sglang_duet.server.hooks import ServerHooks


def instance_hooks(mode: str) -> ServerHooks:
    """The scheduler class, the tokenizer manager's backend and the /disagg/* routes of a
    `--disaggregation-mode prefill|decode` instance."""
    from sglang_duet.disagg.instance_api import add_instance_routes
    from sglang_duet.disagg.instance_backend import InstanceBackend
    from sglang_duet.disagg.scheduler import scheduler_class

    return ServerHooks(scheduler_class=scheduler_class(mode), scheduler_backend=InstanceBackend,
                       add_routes=(add_instance_routes,))

"""`python -m sglang_duet.launch_server [flags]`: serve a model (SGLang's flag names).

The entrypoint is the one place that knows every layer: it picks what the server layer runs
(`server/hooks.py`), so `server/` never imports `disagg/`.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None, prog: str = "python -m sglang_duet.launch_server") -> int:
    from sglang_duet.server.args import parse_args
    from sglang_duet.server.launcher import launch_server

    args = parse_args(argv, prog=prog)
    mode = args.disaggregation_mode
    if mode == "pd-local":  # 1 prefill + 1 decode + router
        from sglang_duet.disagg.local import run_pd_local

        return run_pd_local(args)
    hooks = None
    if mode in ("prefill", "decode"):
        from sglang_duet.disagg.hooks import instance_hooks

        hooks = instance_hooks(mode)
    return launch_server(args, hooks)


if __name__ == "__main__":
    sys.exit(main())

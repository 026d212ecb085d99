"""`python -m sglang_duet.launch_server [flags]`: serve a model (SGLang's flag names)."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None, prog: str = "python -m sglang_duet.launch_server") -> int:
    from sglang_duet.server.args import parse_args
    from sglang_duet.server.launcher import launch_server

    args = parse_args(argv, prog=prog)
    if args.disaggregation_mode == "pd-local":  # disaggregation hook: 1 prefill + 1 decode + router
        from sglang_duet.disagg.local import run_pd_local

        return run_pd_local(args)
    return launch_server(args)


if __name__ == "__main__":
    sys.exit(main())

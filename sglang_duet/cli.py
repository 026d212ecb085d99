"""The `sglang-duet` command.

    sglang-duet serve [flags]     serve a model (same flags as python -m sglang_duet.launch_server)
    sglang-duet [flags]           the same, for SGLang muscle memory
    sglang-duet bench ...         the benchmark client (same flags as python -m benchmark.bench_serving)
    sglang-duet ab EXPERIMENT     the policy A/B harness (python -m benchmark.ab)
"""
from __future__ import annotations

import sys

USAGE = """usage: sglang-duet [serve] [--model-path PATH] [--policy NAME|FILE] [--port N] ...
       sglang-duet bench [bench_serving flags]
       sglang-duet ab configs/experiments/NAME.yaml [--out DIR] [--resume]
       sglang-duet --version

Run `sglang-duet serve --help` for all server flags."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        from sglang_duet import __version__

        print(f"sglang-duet {__version__}")
        return 0
    if argv and argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv and argv[0] == "bench":
        from sglang_duet.benchmark.bench_serving import main as bench

        return bench(argv[1:], prog="sglang-duet bench")
    if argv and argv[0] == "ab":
        from sglang_duet.benchmark.ab import main as ab

        return ab(argv[1:])
    prog = "sglang-duet"
    if argv and argv[0] == "serve":
        argv = argv[1:]
        prog = "sglang-duet serve"
    elif argv and not argv[0].startswith("-"):
        print(f"sglang-duet: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    from sglang_duet.launch_server import main as serve

    return serve(argv, prog=prog)


if __name__ == "__main__":
    sys.exit(main())

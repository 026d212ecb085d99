"""The layers point one way: `server/` never imports `disagg/` (the entrypoint passes hooks in),
and no KV transport backend imports another."""
from __future__ import annotations

import ast
import os
import pkgutil
import subprocess
import sys

import sglang_duet.server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _loaded_after_import(modules: list[str], prefix: str) -> list[str]:
    """The modules under `prefix` loaded after importing `modules` in a fresh interpreter."""
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"print('\\n'.join(sorted(n for n in sys.modules if n.startswith({prefix!r}))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line]


def test_server_layer_does_not_import_disagg():
    modules = sorted(f"sglang_duet.server.{m.name}" for m in pkgutil.iter_modules(sglang_duet.server.__path__))
    assert "sglang_duet.server.launcher" in modules and "sglang_duet.server.scheduler_proc" in modules
    assert _loaded_after_import(modules, "sglang_duet.disagg") == []


def test_server_sources_name_no_disagg_import():
    # Imports inside functions (the old hooks were such) do not show in sys.modules until they run:
    # read every import statement of the package, wherever it is.
    bad = []
    for dirpath, _, files in os.walk(os.path.dirname(sglang_duet.server.__file__)):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            for node in ast.walk(ast.parse(open(path).read(), path)):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                bad += [f"{name}:{node.lineno} {n}" for n in names if n.startswith("sglang_duet.disagg")]
    assert bad == []


def test_transport_backends_import_only_the_interface():
    # cuda_ipc used to import transfer (which imports cuda_ipc): both now import kv_transport
    loaded = _loaded_after_import(["sglang_duet.disagg.cuda_ipc"], "sglang_duet.disagg")
    assert "sglang_duet.disagg.kv_transport" in loaded
    assert "sglang_duet.disagg.transfer" not in loaded


def test_the_entrypoint_passes_the_disagg_hooks():
    from sglang_duet.disagg.hooks import instance_hooks
    from sglang_duet.disagg.instance_api import add_instance_routes
    from sglang_duet.disagg.decode_scheduler import DecodeScheduler
    from sglang_duet.disagg.prefill_scheduler import PrefillScheduler

    assert instance_hooks("prefill").scheduler_class is PrefillScheduler
    assert instance_hooks("decode").scheduler_class is DecodeScheduler
    assert instance_hooks("decode").add_routes == (add_instance_routes,)

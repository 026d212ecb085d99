"""The disaggregation router: one OpenAI + native API in front of prefill and decode instances.

    python -m sglang_duet.launch_server --disaggregation-mode prefill --port 30001 &
    python -m sglang_duet.launch_server --disaggregation-mode decode --port 30002 &
    python -m sglang_duet.router --prefill http://127.0.0.1:30001 --decode http://127.0.0.1:30002 --port 30000

(or `python -m sglang_duet.launch_server --disaggregation-mode pd-local --port 30000` for all three
on one machine). Each request goes to the prefill instance with the shortest queue, then to a
decode instance with KV room, which pulls the KV and streams the output back through here.
See docs/disaggregation.md.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import logging
import os
import signal
import sys
import tempfile
import time

import httpx
import msgspec

from sglang_duet.disagg.router_backend import InstancePool, RouterBackend, RouterConfig
from sglang_duet.server import io_struct as io
from sglang_duet.server.errors import json_response
from sglang_duet.server_args import ServerArgs

logger = logging.getLogger("sglang_duet.router")

GRACEFUL_SHUTDOWN_S = 5
WAIT_FOR_THE_REST_S = 30.0  # startup: once one prefill and one decode instance are ready


class RouterStartupError(RuntimeError):
    pass


def make_parser(prog: str = "python -m sglang_duet.router") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prefill", nargs="+", required=True, metavar="URL", help="prefill instances")
    p.add_argument("--decode", nargs="+", required=True, metavar="URL", help="decode instances")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` from clients")
    p.add_argument("--instance-api-key", default=None, help="the instances' --api-key, if they have one")
    p.add_argument("--served-model-name", default=None, help="default: the instances' name")
    p.add_argument("--prefill-timeout-s", type=float, default=600.0, help="limit on one prefill's HTTP exchange")
    p.add_argument("--decode-timeout-s", type=float, default=600.0,
                   help="longest silence of a decode stream (includes waiting for KV room) before giving up")
    p.add_argument("--max-attempts", type=int, default=4, help="decode attempts per request")
    p.add_argument("--health-interval-s", type=float, default=1.0, help="how often instances are polled")
    p.add_argument("--wait-timeout-s", type=float, default=600.0,
                   help="how long to wait at startup for one prefill and one decode instance (then 30 s for the rest)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"])
    return p


def _fetch_info(client: httpx.Client, url: str) -> dict | None:
    try:
        r = client.get(url + "/disagg/info", timeout=5.0)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        if r.status_code == 404:
            raise RouterStartupError(f"{url} is not a disaggregation instance (no /disagg/info): start it with "
                                     "--disaggregation-mode prefill or decode")
        return None
    info = r.json()
    return info if info.get("ready") and not info.get("dead") else None


def wait_for_instances(prefill: list[str], decode: list[str], timeout_s: float, headers: dict,
                       alive=None) -> dict[str, dict]:
    """/disagg/info of every instance once it is ready; after `timeout_s`, of those that are (at
    least one of each kind), the others to be picked up by the health poll later."""
    deadline = time.monotonic() + timeout_s
    infos: dict[str, dict] = {}
    urls = [u.rstrip("/") for u in prefill + decode]
    logged = 0.0
    servable_since = None  # once one instance of each kind is ready, wait a little for the rest
    with httpx.Client(headers=headers) as client:
        while True:
            for u in urls:
                if u not in infos and (info := _fetch_info(client, u)) is not None:
                    infos[u] = info
                    logger.info("instance %s is ready (%s)", u, info["mode"])
            if len(infos) == len(urls):
                return infos
            if alive is not None and (why := alive()):
                raise RouterStartupError(why)
            servable = (any(u.rstrip("/") in infos for u in prefill) and any(u.rstrip("/") in infos for u in decode))
            if servable and servable_since is None:
                servable_since = time.monotonic()
            now = time.monotonic()
            if now > deadline or (servable and now - servable_since > WAIT_FOR_THE_REST_S):
                missing = [u for u in urls if u not in infos]
                if servable:
                    logger.warning("starting without %s (not ready yet; the health poll adds them when they are)",
                                   missing)
                    return infos
                raise RouterStartupError(f"instances not ready after {timeout_s:.0f} s: {missing}")
            if time.monotonic() - logged > 10:
                logged = time.monotonic()
                logger.info("waiting for %s", [u for u in urls if u not in infos])
            time.sleep(0.5)


def check_instances(prefill: list[str], decode: list[str], infos: dict[str, dict]) -> tuple[io.ReadyInfo, dict, str]:
    """Same model and KV layout everywhere, the right mode on each; returns the router's ReadyInfo,
    the tokenizer files and the served model name."""
    for urls, mode in ((prefill, "prefill"), (decode, "decode")):
        for u in urls:
            info = infos.get(u.rstrip("/"))
            if info is not None and info["mode"] != mode:
                raise RouterStartupError(f"{u} is a {info['mode']} instance, given as --{mode}")
    ready = list(infos.values())
    first_p = next(infos[u.rstrip("/")] for u in prefill if u.rstrip("/") in infos)
    ref = first_p["ready_info"]
    for info in ready:
        ri = info["ready_info"]
        for key in ("vocab_size", "eos_token_ids", "model_name"):
            if ri.get(key) != ref.get(key):
                raise RouterStartupError(f"instances disagree on {key}: {ri.get(key)!r} vs {ref.get(key)!r}")
        t, t0 = info["disagg"]["transfer"], first_p["disagg"]["transfer"]
        if t["backend"] != t0["backend"] or t["layout"] != t0["layout"]:
            raise RouterStartupError(f"instances disagree on the KV transfer: {t} vs {t0}")
    decodes = [infos[u.rstrip("/")] for u in decode if u.rstrip("/") in infos]
    info = msgspec.convert({**ref, "tokenizer_dir": None}, io.ReadyInfo)
    info = msgspec.structs.replace(
        info, context_length=min(i["ready_info"]["context_length"] for i in ready),
        kv_slots=min(i["ready_info"]["kv_slots"] for i in ready),
        max_running_requests=sum(i["ready_info"]["max_running_requests"] for i in decodes),
        policy={"name": "disaggregated", "prefill": ref.get("policy"),
                "decode": decodes[0]["ready_info"].get("policy"),
                "transfer": first_p["disagg"]["transfer"]["backend"]})
    return info, first_p.get("tokenizer_files") or {}, first_p["served_model_name"]


def run_router(ns: argparse.Namespace, alive=None) -> int:
    """Serve until SIGTERM/SIGINT. `alive()` (pd-local) names a reason to give up while waiting."""
    logging.basicConfig(level=ns.log_level.upper(), format="[%(asctime)s router] %(levelname)s %(message)s")
    if ns.log_level != "debug":
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll and per request otherwise
    headers = {"Authorization": f"Bearer {ns.instance_api_key}"} if ns.instance_api_key else {}
    try:
        infos = wait_for_instances(ns.prefill, ns.decode, ns.wait_timeout_s, headers, alive)
        info, tok_files, name = check_instances(ns.prefill, ns.decode, infos)
    except RouterStartupError as e:
        logger.error("%s", e)
        return 1
    server_args = ServerArgs(host=ns.host, port=ns.port, api_key=ns.api_key, log_level=ns.log_level,
                             served_model_name=ns.served_model_name or name, skip_warmup=True,
                             disaggregation_mode="router")
    pool = InstancePool(ns.prefill, ns.decode)
    for inst in pool.all:
        inst.healthy = inst.url in infos
        if inst.healthy:
            inst.kv_total = infos[inst.url]["ready_info"]["kv_slots"]
            inst.kv_free = inst.kv_total
    config = RouterConfig(prefill_timeout_s=ns.prefill_timeout_s, decode_timeout_s=ns.decode_timeout_s,
                          health_interval_s=ns.health_interval_s, max_attempts=ns.max_attempts,
                          instance_api_key=ns.instance_api_key)
    with tempfile.TemporaryDirectory(prefix="sglang-duet-router-") as private:
        info = msgspec.structs.replace(info, tokenizer_dir=write_tokenizer(tok_files, private))
        return _serve(ns, server_args, info, pool, RouterBackend(pool, config))


def write_tokenizer(files: dict[str, str], root: str) -> str | None:
    """The instances' tokenizer files (base64, from /disagg/info) as a folder the manager loads."""
    if not files:
        return None
    tok_dir = os.path.join(root, "tokenizer")
    os.makedirs(tok_dir)
    for name, b64 in files.items():
        with open(os.path.join(tok_dir, os.path.basename(name)), "wb") as f:
            f.write(base64.b64decode(b64))
    return tok_dir


def _serve(ns, server_args, info: io.ReadyInfo, pool: InstancePool, backend: RouterBackend) -> int:
    import uvicorn

    from sglang_duet.server.http_server import create_app
    from sglang_duet.server.tokenizer_manager import TokenizerManager

    tm = TokenizerManager(server_args, info, backend)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        tm.start()
        tm.ready = True
        url = f"http://{ns.host}:{ns.port}"
        logger.info("router ready at %s: %d prefill, %d decode instance(s), transfer %s", url,
                    len(pool.prefill), len(pool.decode), info.policy["transfer"])
        print(f"sglang-duet router ready: {url}", file=sys.stderr, flush=True)
        yield
        await backend.aclose()

    app = create_app(tm, server_args, lifespan=lifespan)

    @app.get("/disagg/instances")
    async def instances():
        return json_response(tm.internal_state())

    level = ns.log_level.lower()
    config_uv = uvicorn.Config(app, host=ns.host, port=ns.port, loop="uvloop", log_level=level,
                               access_log=level == "debug", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                               timeout_keep_alive=30)
    server = uvicorn.Server(config_uv)
    try:
        server.run()
    finally:
        tm.close()
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    ns = make_parser().parse_args(argv)

    def stop(sig, _frame):  # until uvicorn installs its own handlers
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    return run_router(ns)


if __name__ == "__main__":
    sys.exit(main())

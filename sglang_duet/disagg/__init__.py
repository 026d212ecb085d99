"""Disaggregated serving (DistServe's idea): prefill instances and decode instances, KV pulled
from one to the other, a router in front, and a placement search in the simulator.

- `kv_transport.py`: the KV transport interface (export / import / release / describe), which every
  backend imports (and nothing else of this package's transports): `transfer.py` (shared memory,
  the metadata-only one for the emulated executor, `make_transport`), `cuda_ipc.py` (GPUs of one
  machine), `mooncake.py` (any two hosts, Mooncake transfer engine), `host_aware.py` (`auto`: the
  same-host path or Mooncake, by the peer's machine).
- `messages.py`: the typed messages of the disaggregation protocol (msgspec, never pickle).
- `scheduler.py`: what the scheduler processes of both kinds of instance share;
  `prefill_scheduler.py` and `decode_scheduler.py`: each kind's own.
- `hooks.py`: what an instance plugs into the server (scheduler class, the tokenizer manager's
  backend, routes); the entrypoint passes it in, so `server/` never imports this package.
- `instance_backend.py`: that backend: sends a disaggregated request's own message kind.
- `instance_api.py`: the HTTP routes an instance adds (/disagg/info, /disagg/prefill, ...).
- `pd_http.py` + `rooms.py`: SGLang's PD protocol (sglang-router --pd-disaggregation: bootstrap
  host/port/room on the ordinary routes; the decode asks the prefill for the room's KV).
- `router_backend.py` + `sglang_duet/router.py`: this project's router (the server's own tokenizer
  manager and API with an HTTP scheduler backend), kept for what sglang-router cannot do.
- `local.py`: `launch_server --disaggregation-mode pd-local` (1 prefill + 1 decode + sglang-router or ours).
- `placement.py`, `cluster_sim.py`: DistServe's placement search on the simulator.

See docs/disaggregation.md.
"""

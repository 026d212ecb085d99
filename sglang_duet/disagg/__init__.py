"""Disaggregated serving (DistServe's idea): prefill instances and decode instances, KV pulled
from one to the other, a router in front, and a placement search in the simulator.

- `transfer.py`: the KV transport interface (export / import / release / describe), the
  shared-memory transport and the metadata-only one for the emulated executor;
  `cuda_ipc.py`: the CUDA IPC transport between GPU processes of one machine.
- `messages.py`: the typed messages of the disaggregation protocol (msgspec, never pickle).
- `scheduler.py`: the scheduler process of a prefill or a decode instance.
- `instance_api.py`: the HTTP routes an instance adds (/disagg/info, /disagg/prefill, ...).
- `router_manager.py` + `sglang_duet/router.py`: the router (the same OpenAI and native API).
- `local.py`: `launch_server --disaggregation-mode pd-local` (1 prefill + 1 decode + router).
- `placement.py`, `cluster_sim.py`: DistServe's placement search on the simulator.

See docs/disaggregation.md.
"""

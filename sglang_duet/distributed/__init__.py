"""Tensor parallelism on torch.distributed: the process group (`parallel_state`), how weights are
split (`sharding`) and the follower ranks' loop (`tp_worker`). See docs/architecture.md, "Tensor
parallelism"."""

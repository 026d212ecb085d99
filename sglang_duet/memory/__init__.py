from sglang_duet.memory.kv_pool import KVCachePool

__all__ = ["KVCachePool"]

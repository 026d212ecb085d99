from sglang_duet.memory.kv_pool import KVCachePool
from sglang_duet.memory.req_to_token import ReqToTokenTable

__all__ = ["KVCachePool", "ReqToTokenTable"]

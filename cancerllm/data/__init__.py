"""Data: token shards (`write_shard` / `read_shard`), the `prepare` command that makes them, and `PackedLoader`,
which turns them into fixed-length training batches (C++ extension `cancerllm._C`, or pure Python)."""
from .loader import PackedLoader
from .shards import Shard, ShardError, read_shard, write_shard

__all__ = ["PackedLoader", "Shard", "ShardError", "read_shard", "write_shard"]

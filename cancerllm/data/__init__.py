"""Data: token shards (`write_shard` / `read_shard`), the `prepare` command that makes them, and `PackedLoader`,
which turns them into fixed-length training batches (C++ extension `cancerllm._C`, or pure Python).

The public names import their module on first use (`cancerllm/_lazy.py`): each tool loads only what it needs."""
from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

__all__ = ["PackedLoader", "Shard", "ShardError", "read_shard", "write_shard"]

__getattr__, __dir__ = lazy_attributes(__name__, {
    "PackedLoader": "loader", "Shard": "shards", "ShardError": "shards", "read_shard": "shards",
    "write_shard": "shards"})

if TYPE_CHECKING:   # what type checkers and IDEs see
    from .loader import PackedLoader
    from .shards import Shard, ShardError, read_shard, write_shard

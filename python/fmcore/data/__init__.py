"""Token data: the shard format (shards), `fmcore prepare` (prepare) and the C++ loader (Loader)."""

from fmcore.data.loader import Batch, Loader
from fmcore.data.prepare import default_dataset, default_dataset_dir, default_dataset_root, prepare
from fmcore.data.shards import (ShardError, load_manifest, read_header, read_shard, verify_dataset, write_dataset,
                                write_llmc_shard, write_shard)

__all__ = ["Batch", "Loader", "ShardError", "default_dataset", "default_dataset_dir", "default_dataset_root",
           "load_manifest", "prepare", "read_header", "read_shard", "verify_dataset", "write_dataset",
           "write_llmc_shard", "write_shard"]

"""fmcore.dist: collectives and data-parallel algorithms.

- ``Communicator``: all_reduce / reduce_scatter / all_gather / broadcast over fmcore's NCCL
  communicator (csrc/dist) on CUDA, or torch.distributed (gloo on the CPU) otherwise.
- ``GradReducer``: bucketed gradient all-reduce overlapping the backward (DDP's algorithm).
- ``ZeroAdamW``: ZeRO stage 1 AdamW (sharded fp32 master weights and moments), its bucketed gradient
  reduce-scatter overlapping the backward on the same bucketing (fmcore.dist.reducer.GradBuckets).
"""

from fmcore.dist.comm import Communicator, NcclError, Work, nccl_available
from fmcore.dist.reducer import GradReducer
from fmcore.dist.zero import ZeroAdamW

__all__ = ["Communicator", "GradReducer", "NcclError", "Work", "ZeroAdamW", "nccl_available"]

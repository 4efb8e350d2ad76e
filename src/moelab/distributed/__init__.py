"""Data and expert parallelism over torch.distributed, launched with torchrun (docs/distributed.md).

layout           which rank holds which experts; impossible layouts refused before any work
expert_parallel  the all-to-all (differentiable) and the expert-parallel experts module
data_parallel    DDP, expert gradients, the global gradient norm, reduced losses and statistics
fsdp             FSDP2 (parallel.data_parallel = "fsdp"): fully_shard per block and root; with expert
                 parallelism a 2-D (ep, replica) mesh for the experts; full-state checkpoints
checkpoint       single-process-format checkpoints from any world size, re-split on load
runtime          `Distributed`: what the trainer calls
"""

from moelab.distributed.layout import Layout, check_layout
from moelab.distributed.runtime import Distributed, wanted

__all__ = ["Distributed", "Layout", "check_layout", "wanted"]

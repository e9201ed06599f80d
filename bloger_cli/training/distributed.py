"""Data-parallel training under `torchrun` (DESIGN.md section 5): DDP for the recommender, the
tokenizer's gradients all-reduced by hand.

Every rank sees the same global batch order (the seeded permutation) and takes its slice of each
global batch. A slice's loss is a mean over its own label tokens; every sample has the same number of
label tokens, so the global batch's mean loss is sum_r share_r * loss_r with share_r = n_r / n. The
recommender's backward pass scales its loss by world * share_r (DDP averages over ranks), and the
tokenizer's gradients are summed over ranks after the same weighting, so a run of W processes takes
the steps of one process on the same global batch (up to float rounding and dropout masks).

Without torchrun (WORLD_SIZE unset or 1) everything here is the identity: world 1, share 1.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger(__name__)


class Part(NamedTuple):
    """This rank's slice of a global batch: its share of the batch's samples (0 when the slice is a
    stand-in for an empty one) and the global batch's distinct items (for L_tok), None in one process."""

    share: float = 1.0
    items: Tensor | None = None


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Distributed:
        """The process group torchrun describes in the environment (joined on first use), or one process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local)
            dist.init_process_group(backend)
            log.info("process group: %s, %d processes", backend, world)
        return cls(rank, world, local)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """This rank's GPU when training on CUDA (one process per GPU)."""
        return torch.device("cuda", self.local_rank) if self.enabled and device.type == "cuda" else device

    def wrap(self, model: nn.Module) -> nn.Module | None:
        """The DDP wrapper the ordinary step runs the model through (None in one process)."""
        if not self.enabled:
            return None
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def shard(self, index: Tensor) -> tuple[Tensor, float]:
        """This rank's slice of a global batch's sample index and its share; a rank left without samples
        (a last batch smaller than the world) computes on the batch's first sample with share 0."""
        if not self.enabled:
            return index, 1.0
        local = torch.tensor_split(index, self.world)[self.rank]
        if len(local) == 0:
            return index[:1], 0.0
        return local, len(local) / len(index)

    def sum_(self, tensors: list[Tensor]) -> None:
        """Sum each tensor over the ranks, in place."""
        if self.enabled:
            for t in tensors:
                dist.all_reduce(t)

    def any_(self, flag: bool, device: torch.device | None = None) -> bool:
        """True on every rank when it is true on any: decisions that read each rank's own clock (a time
        budget) must be the same everywhere, or one rank waits in a collective the others never reach."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's object on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Leave the process group. Without this a gloo process can abort at interpreter exit
        ("terminate called without an active exception") while its communication threads wind down."""
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def gather(self, tensor: Tensor) -> Tensor:
        """Every rank's tensor, concatenated in rank order (sizes may differ), on every rank."""
        if not self.enabled:
            return tensor
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, tensor.cpu())
        return torch.cat(parts).to(tensor.device)

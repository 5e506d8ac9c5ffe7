"""A training process's place in a torchrun job, and what its ranks agree on: one stop
step, barriers, every rank's RNG state, summed validation metrics. Outside torchrun every
helper is a no-op on rank 0 of 1."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.checkpoint import ModelCard
from model.device import Placement
from model.engine import EvalResult


@dataclass
class DistContext:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1 and dist.is_available() and dist.is_initialized()

    def place(self, placement: Placement) -> Placement:
        """This rank's device: under torchrun with CUDA, the GPU of its local rank."""
        if placement.device.type == "cuda" and self.world > 1:
            torch.cuda.set_device(self.local_rank)
            return Placement(torch.device("cuda", self.local_rank), placement.precision)
        return placement

    def agree_to_stop(self, mine: bool) -> bool:
        """Every rank stops at the same step if any rank was asked to stop."""
        if not self.active:
            return mine
        flag = torch.tensor([1.0 if mine else 0.0])
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather_rng_states(self) -> list[torch.Tensor]:
        """Every rank's torch RNG state, in rank order (on every rank)."""
        rng = torch.get_rng_state()
        if not self.active:
            return [rng]
        on_gpu = dist.get_backend() == "nccl"  # NCCL gathers CUDA tensors only
        mine = rng.cuda() if on_gpu else rng
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine)
        return [t.cpu() for t in gathered]

    def sum_eval(self, local: EvalResult, device: torch.device) -> EvalResult:
        """Validation over all ranks' shards: sums, so every image counts once."""
        if not self.active:
            return local
        t = local.as_tensor().to(device if device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return EvalResult.from_tensor(t.cpu())

    def broadcast_card(self, card: ModelCard | None) -> ModelCard | None:
        """Rank 0's new version, on every rank."""
        if not self.active:
            return card
        box = [card.model_dump(mode="json") if card else None]
        dist.broadcast_object_list(box, src=0)
        return ModelCard.model_validate(box[0])

"""An exponential moving average of a network's weights (timm's ModelEmaV2, torchvision's
reference `--model-ema`): after every optimizer step, ema = decay * ema + (1 - decay) * w.

The average is a second copy of the network (same device, dtype and memory format), so it
can be validated as it is; `TrainConfig.ema_decay` makes it what is validated, kept as the
best epoch and saved as the version. Its tensors travel in the run's state file under
`ema.` so a resumed run continues the same average (model/run_state.py)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA:
    def __init__(self, net: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), not {decay}")
        self.decay = decay
        self.net = copy.deepcopy(net).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self._pairs = self._match(net)

    def _match(
        self, net: nn.Module
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """The averaged (floating point) and copied (integer: counters) tensors, each with
        its source in `net`, in state_dict order."""
        mine, theirs = self.net.state_dict(), net.state_dict()
        if mine.keys() != theirs.keys():
            raise ValueError("the EMA copy and the network differ in their tensors")
        avg = [k for k, v in mine.items() if v.is_floating_point()]
        cp = [k for k, v in mine.items() if not v.is_floating_point()]
        return ([mine[k] for k in avg], [theirs[k] for k in avg],
                [mine[k] for k in cp], [theirs[k] for k in cp])  # fmt: skip

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step of the network this copy was made from."""
        dst, src, dst_i, src_i = self._pairs
        torch._foreach_lerp_(dst, [t.to(d.dtype) for t, d in zip(src, dst, strict=True)],
                             1.0 - self.decay)  # fmt: skip
        for d, t in zip(dst_i, src_i, strict=True):
            d.copy_(t)

    def tensors(self) -> dict[str, torch.Tensor]:
        """For the run's state file (CPU copies, `ema.` + the state_dict key)."""
        return {f"ema.{k}": v.detach().to("cpu", copy=True).contiguous()
                for k, v in self.net.state_dict().items()}  # fmt: skip

    def restore(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Load a state file's `ema.` tensors; False where it has none (the average then
        restarts from the restored weights)."""
        saved = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        if not saved:
            return False
        with torch.no_grad():
            for k, v in self.net.state_dict().items():
                v.copy_(saved[k])
        return True

"""One client's local training on several processes (ranks), with ``torch.distributed``.

What DDP does, written into fedfm's own step: every rank draws the same global batch (the same
seeded order), takes its share of the rows (``rank``, ``rank + world``, …), and backpropagates
its share's loss weighted by the share's size over the batch's; before each optimizer step the
gradients are summed across ranks (``all_reduce``), so that every rank holds the gradient of the
whole batch's mean loss and takes the same step: every rank ends the round with the same
parameters, equal to one process's to float tolerance. Gradient accumulation, rank masks,
clipping and the optimizer act on the summed gradient, as in one process. Backend: gloo on CPU
(NCCL is the choice on GPUs; not run here).

Limits, said where they apply: a causal LM's loss is a mean over tokens, and shares are weighted
by rows, so with unequal token counts the sum differs slightly from one process's mean; dropout
masks are drawn per rank (as under DDP); DP-SGD is refused (its per-example clipping and noise
would have to be made across ranks). A rank that dies or stalls makes the other ranks'
collective fail after ``timeout_s`` with the reason; nothing waits forever.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass

import torch

_current: Ranks | None = None


@dataclass(frozen=True)
class Ranks:
    """This process's place among the client's training processes."""

    rank: int
    world: int

    def share(self, positions: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a batch (every ``world``-th from ``rank``)."""
        return positions[self.rank :: self.world]

    def sum_gradients(self, params: Iterable[torch.Tensor]) -> None:
        """Σ over ranks of each parameter's gradient, in place (a missing gradient counts as 0)."""
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)

    def sum_value(self, x: float) -> float:
        import torch.distributed as dist

        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)


def current() -> Ranks | None:
    """The ranks this process trains among, or None (one process)."""
    return _current


def join(rank: int, world: int, address: str, timeout_s: float = 120.0) -> Ranks:
    """Join the client's process group (gloo over TCP at ``address``, ``host:port``); every later
    local training in this process trains as ``rank`` of ``world``."""
    import torch.distributed as dist

    global _current
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{address}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    _current = Ranks(rank, world)
    return _current


def leave() -> None:
    """Leave the process group (at the end of the run)."""
    import torch.distributed as dist

    global _current
    _current = None
    if dist.is_initialized():
        dist.destroy_process_group()


def check(cfg) -> None:
    """What local training on several ranks cannot do (``ValueError`` with the reason)."""
    from fedfm.privacy.guarantees import dp_mode

    if dp_mode(cfg).example_level:
        raise ValueError(
            "DP-SGD (privacy.dp = 'example') on several processes would need its per-example "
            "clipping and noise made across ranks; train DP-SGD clients in one process (--nproc 1)"
        )

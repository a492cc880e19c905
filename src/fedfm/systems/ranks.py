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
    """This process's place among the client's training processes; ``shard_base``: the frozen
    base model is sharded across them (FSDP, see ``shard``)."""

    rank: int
    world: int
    shard_base: bool = False

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


@dataclass(frozen=True)
class Layout:
    """How one client's local training is laid out on processes: ``nproc`` ranks; the seconds a
    collective waits for a missing rank before the round fails; the frozen base sharded (FSDP)."""

    nproc: int = 1
    timeout_s: float = 300.0
    shard_base: bool = False

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ValueError(f"nproc must be at least 1 (got {self.nproc})")
        if self.shard_base and self.nproc < 2:
            raise ValueError("sharding the base (FSDP) needs at least 2 processes")


def current() -> Ranks | None:
    """The ranks this process trains among, or None (one process)."""
    return _current


def join(rank: int, world: int, address: str, timeout_s: float = 120.0, shard_base: bool = False) -> Ranks:
    """Join the client's process group (gloo over TCP at ``address``, ``host:port``); every later
    local training in this process trains as ``rank`` of ``world`` (with its frozen base sharded
    across the ranks when ``shard_base``)."""
    import torch.distributed as dist

    global _current
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{address}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    _current = Ranks(rank, world, shard_base)
    return _current


def leave() -> None:
    """Leave the process group (at the end of the run)."""
    import torch.distributed as dist

    global _current
    _current = None
    if dist.is_initialized():
        dist.destroy_process_group()


def check(cfg, shard_base: bool = False) -> None:
    """What local training on several ranks (with the base sharded) cannot do (``ValueError``
    with the reason)."""
    from fedfm.privacy.guarantees import dp_mode

    if shard_base and cfg.peft.method == "full":
        raise ValueError(
            "sharding the frozen base (FSDP) needs a frozen base: with peft.method = 'full' every "
            "weight trains; train on several processes without sharding"
        )

    if dp_mode(cfg).example_level:
        raise ValueError(
            "DP-SGD (privacy.dp = 'example') on several processes would need its per-example "
            "clipping and noise made across ranks; train DP-SGD clients in one process (--nproc 1)"
        )


def shard(model: torch.nn.Module, trainable: dict[str, torch.Tensor]) -> bool:
    """Shard ``model``'s frozen weights across the ranks with FSDP (PyTorch's ``fully_shard``,
    FSDP2), once; True when this call sharded it. Each block the model names as not to be split
    (``_no_split_modules``, as accelerate's transformer auto-wrap uses it) is one FSDP unit, then
    the root. The trainable parameters are left out of FSDP (``ignored_params``): they stay whole
    on every rank and their gradients are summed by ``sum_gradients``, so training is the same as
    unsharded; the frozen base is held 1/world per rank and gathered block by block in forward
    and backward. Every rank must therefore run the same forwards (``client_step`` gives a rank
    with an empty share a zero-weighted row)."""
    if getattr(model, "_fedfm_sharded", False):
        return False
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ignored = set(trainable.values())
    if all(p in ignored for p in model.parameters()):
        raise ValueError("sharding the frozen base (FSDP) needs a frozen base: every weight trains")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    for block in [m for m in model.modules() if type(m).__name__ in names]:
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    model._fedfm_sharded = True
    return True


def held_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of parameters this rank holds, bytes of the whole model's parameters): a sharded
    parameter counts its local shard."""
    from torch.distributed.tensor import DTensor

    held = total = 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        held += local.numel() * local.element_size()
        total += p.numel() * p.element_size()
    return held, total

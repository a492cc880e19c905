"""Per-row adapter selection: many clients' LoRA factors and heads in one pass over one base model.

The rows of a combined batch are grouped by client (segment j holds ``sizes[j]`` rows of the
client in stack slot ``slots[j]``). Every trainable tensor of the shared model is replaced, for the
duration of a ``MultiAdapter`` context, by a stacked tensor with one slice per client
(``[k, *shape]``): a LoRA layer adds ``B_j A_j dropout_j(x)`` · scaling to the frozen base layer's
output for the rows of segment j, and a trainable linear layer (the classification head, saved by
PEFT as ``modules_to_save``) computes ``x W_jᵀ + b_j``. This is the grouped matmul of multi-LoRA
systems (Punica's BGMV / SGMV, S-LoRA, mLoRA): one batched matmul when all segments are the same
size, one small matmul per segment otherwise; the frozen base weights are used once for all rows.

LoRA dropout draws each client's masks from that client's own generator, in the shape the client's
own batch has (``widths``), the way ``torch.nn.functional.dropout`` draws them on the CPU: so a
client's masks are the ones it draws when it trains alone. Dropout inside the frozen base model
(hidden and attention dropout) draws from torch's default generator over the combined batch.

Only LoRA factors (``lora_A`` / ``lora_B`` of PEFT's LoRA layers) and whole linear layers can be
stacked; ``unbatchable`` names any other trainable tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Segments:
    """How the rows of the combined batch split among clients.

    ``slots``: each segment's client slot in the stacks (a long tensor, on the model's device);
    ``sizes``: rows per segment; ``widths``: the sequence length of each client's own batch
    (None: rows of one fixed size, as images are);
    ``dropout``: each segment's generator for LoRA dropout (None where no LoRA dropout runs).
    """

    slots: torch.Tensor
    sizes: tuple[int, ...]
    widths: tuple[int, ...]
    dropout: tuple[torch.Generator | None, ...] = ()
    every_slot: bool = False  # slots == arange(k): the stacks are used without a gather

    @property
    def uniform(self) -> bool:
        return len(set(self.sizes)) == 1


def select(stack: torch.Tensor, seg: Segments) -> torch.Tensor:
    """The stack's slices for the segments, in segment order."""
    return stack if seg.every_slot else stack.index_select(0, seg.slots)


def segment_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seg: Segments
) -> torch.Tensor:
    """Row block j of ``x`` (``[N, ..., in]``) times ``weight[j]ᵀ`` (``[m, out, in]``) plus
    ``bias[j]``: a batched matmul when the segments are the same size, else one per segment."""
    if seg.uniform:
        m = len(seg.sizes)
        xs = x.reshape(m, -1, x.shape[-1])
        w = weight.transpose(1, 2).to(xs.dtype)
        out = torch.bmm(xs, w) if bias is None else torch.baddbmm(bias.unsqueeze(1).to(xs.dtype), xs, w)
        return out.reshape(*x.shape[:-1], weight.shape[1])
    parts = x.split(list(seg.sizes))
    outs = [
        F.linear(part, weight[j].to(part.dtype), None if bias is None else bias[j].to(part.dtype))
        for j, part in enumerate(parts)
    ]
    return torch.cat(outs)


def segment_dropout(x: torch.Tensor, p: float, seg: Segments) -> torch.Tensor:
    """Inverted dropout with each segment's masks from its own generator, drawn as
    ``F.dropout`` draws them on the CPU (a float tensor, ``bernoulli_(1 − p)``, divided by
    1 − p) in the shape of the client's own batch (``widths``); positions beyond it are padding."""
    if p == 0:
        return x
    outs = []
    for part, width, gen in zip(x.split(list(seg.sizes)), seg.widths, seg.dropout, strict=True):
        width = part.shape[1] if width is None and part.dim() >= 3 else width  # fixed-size rows (images)
        own = (part.shape[0], width, *part.shape[2:]) if part.dim() >= 3 else part.shape
        noise = torch.empty(own, dtype=part.dtype, device=gen.device).bernoulli_(1 - p, generator=gen)
        noise = noise.div_(1 - p).to(part.device)
        if part.dim() >= 3 and width < part.shape[1]:
            noise = F.pad(noise, (0, 0) * (part.dim() - 2) + (0, part.shape[1] - width), value=1.0)
        outs.append(part * noise)
    return torch.cat(outs)


@dataclass
class _Lora:
    a: str  # payload keys of the stacked factors
    b: str
    scaling: float
    dropout: float


@dataclass
class _Linear:
    weight: str
    bias: str | None


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def stack_plan(model: nn.Module, trainable: Mapping[str, nn.Parameter]) -> dict[nn.Module, object]:
    """Module → what it computes from the stacks (``_Lora`` or ``_Linear``); raises ``ValueError``
    naming a trainable tensor that is neither a LoRA factor nor part of a whole linear layer."""
    key_of = {id(p): k for k, p in trainable.items()}
    plan: dict[nn.Module, object] = {}
    inside_lora: set[int] = set()
    for layer in _lora_layers(model):
        if "default" not in layer.lora_A:
            continue
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        inside_lora.update(id(m) for m in (layer.lora_A["default"], layer.lora_B["default"]))
        if id(a) not in key_of or id(b) not in key_of:
            continue
        if not isinstance(layer.get_base_layer(), nn.Linear):
            kind = type(layer.get_base_layer()).__name__
            raise ValueError(
                f"the batched engine batches LoRA on linear layers; this model has LoRA on a {kind} "
                "(use run.engine = 'inprocess', or peft.method = 'head')"
            )
        if layer.use_dora.get("default") or getattr(layer, "lora_variant", {}).get("default"):
            raise ValueError("the batched engine batches plain LoRA (not DoRA or another LoRA variant)")
        drop = layer.lora_dropout["default"]
        p = drop.p if isinstance(drop, nn.Dropout) else 0.0
        plan[layer] = _Lora(key_of[id(a)], key_of[id(b)], float(layer.scaling["default"]), p)
    for module in model.modules():
        if not isinstance(module, nn.Linear) or id(module) in inside_lora:
            continue
        w_key = key_of.get(id(module.weight))
        b_key = key_of.get(id(module.bias)) if module.bias is not None else None
        if w_key is None and b_key is None:
            continue
        if w_key is None or (module.bias is not None and b_key is None):
            raise ValueError(f"trainable tensors of {w_key or b_key!r}'s layer are only partly trainable")
        plan[module] = _Linear(w_key, b_key)
    covered = {k for spec in plan.values() for k in vars(spec).values() if isinstance(k, str)}
    missing = [k for k in trainable if k not in covered]
    if missing:
        raise ValueError(
            f"the batched engine cannot stack trainable tensor {missing[0]!r}: it batches LoRA factors "
            "and whole linear layers (heads) only"
        )
    return plan


class MultiAdapter:
    """While active, the model computes each row with its own client's stacked tensors.

    ``stacks`` maps payload keys to ``[k, *shape]`` leaf tensors; ``segments`` says which rows belong
    to which slice (set before each forward).
    """

    def __init__(self, model: nn.Module, trainable: Mapping[str, nn.Parameter]) -> None:
        self.model = model
        self.plan = stack_plan(model, trainable)
        self.stacks: dict[str, torch.Tensor] = {}
        self.segments: Segments | None = None
        self.saved: dict[nn.Module, object] = {}

    def __enter__(self) -> MultiAdapter:
        self.saved = {m: m.__dict__["forward"] for m in self.plan if "forward" in m.__dict__}
        try:
            for module, spec in self.plan.items():
                module.forward = self._forward(module, spec)  # an instance attribute shadows the class's
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for module in self.plan:  # back to the class's forward, or a hook's that was there before
            module.__dict__.pop("forward", None)
            if module in self.saved:
                module.forward = self.saved[module]
        self.stacks, self.segments = {}, None

    def _forward(self, module: nn.Module, spec):
        if isinstance(spec, _Lora):

            def lora_forward(x, *args, **kwargs):
                result = module.base_layer(x, *args, **kwargs)
                seg = self.segments
                a, b = select(self.stacks[spec.a], seg), select(self.stacks[spec.b], seg)
                h = segment_dropout(x.to(a.dtype), spec.dropout, seg)
                delta = segment_linear(segment_linear(h, a, None, seg), b, None, seg) * spec.scaling
                return (result + delta).to(result.dtype)

            return lora_forward

        def linear_forward(x):
            seg = self.segments
            bias = None if spec.bias is None else select(self.stacks[spec.bias], seg)
            return segment_linear(x, select(self.stacks[spec.weight], seg), bias, seg)

        return linear_forward


def stack_params(params: Mapping[str, torch.Tensor], k: int, device) -> dict[str, torch.Tensor]:
    """k copies of each tensor as one ``[k, *shape]`` leaf that requires grad."""
    return {
        key: v.to(device, torch.float32).unsqueeze(0).repeat(k, *([1] * v.dim())).requires_grad_(True)
        for key, v in params.items()
    }


def stack_each(params: Sequence[Mapping[str, torch.Tensor]], device) -> dict[str, torch.Tensor]:
    """Client j's tensors at slot j of one ``[k, *shape]`` leaf that requires grad (clients that
    start from their own personal tensors)."""
    return {
        key: torch.stack([p[key].to(device, torch.float32) for p in params]).requires_grad_(True)
        for key in params[0]
    }


def collate(batches: Sequence[dict], pad: Mapping[str, int]) -> dict:
    """One batch from per-client batches: 2-D tensors right-padded to the widest with ``pad[key]``,
    rows concatenated in order."""
    out = {}
    for key in batches[0]:
        parts = [b[key] for b in batches]
        if parts[0].dim() >= 2 and len({p.shape[1] for p in parts}) > 1:  # images share one size
            width = max(p.shape[1] for p in parts)
            parts = [F.pad(p, (0, width - p.shape[1]), value=pad[key]) for p in parts]
        out[key] = torch.cat(parts)
    return out

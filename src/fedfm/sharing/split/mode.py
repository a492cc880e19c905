"""Split fine-tuning (SplitFed / SplitLoRA style): a client runs only the bottom of the FM.

The client runs the embeddings and the first ``split.cut_layer`` layers (with its LoRA), sends
the **cut-layer activations** (compressed to ``split.activation_bits``, optionally with Gaussian
noise of std ``split.activation_noise``), the server runs the rest of the model and the loss, and
returns the **gradient at the cut**, which the client validates (finite, norm within
``split.max_cut_grad_norm``) before its backward pass. ``split.u_shaped``: the head runs on the
client too (the server sends the last layer's hidden states and gets their gradient back), so
labels never leave the client.

Rounds are SplitFed-v1: each client's bottom part trains from the global state; the server
trains a copy of the top part on that client's activations; at the end of the round the client
sends its bottom update (the ``split`` payload: only the client-side tensors travel) and the
server averages the bottom updates and its top copies as one FedAvg update.

Across processes, ``fedfm server`` and ``fedfm client`` exchange every batch over gRPC
(``fedfm.sharing.split.client`` and ``.server``). In a simulation both parts run in one process
and one autograd pass; the cut is an autograd function whose forward is the client → server
message and whose backward is the server → client message, so the compression, the noise, the
bytes and the validation are those of a real exchange. A split with no compression and no noise
computes exactly the unsplit model's gradients.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field

from fedfm.config.sections import Section
from fedfm.models.resolve import ModelError
from fedfm.seeding import NoiseSource
from fedfm.sharing.base import SHARING_MODES, RemoteHalves, SharingMode
from fedfm.sharing.split.codec import check_cut_gradient, roundtrip
from fedfm.sharing.split.payload import client_part
from fedfm.transforms.compression import compresses


@dataclass
class Exchange:
    """One client's cut traffic in one round: the bytes each way, the settings, the noise draws."""

    bits: int
    noise: float
    max_grad_norm: float | None
    generator: torch.Generator | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    messages: int = 0

    def client_to_server(self, h: torch.Tensor) -> torch.Tensor:
        out, n = roundtrip(h, self.bits)
        if self.noise > 0:  # noise on the activations: a CSPRNG-seeded generator per client and round
            out = out + self.noise * torch.randn(out.shape, generator=self.generator).to(out)
        self.bytes_up += n
        self.messages += 1
        return out

    def server_to_client(self, h: torch.Tensor) -> torch.Tensor:
        out, n = roundtrip(h, self.bits)
        self.bytes_down += n
        return out

    def gradient_to_client(self, g: torch.Tensor) -> torch.Tensor:
        """The gradient the server returns at the cut, as the client checks and receives it."""
        check_cut_gradient(g, self.max_grad_norm, "the server's gradient at the cut")
        out, n = roundtrip(g, self.bits)
        self.bytes_down += n
        return out

    def gradient_to_server(self, g: torch.Tensor) -> torch.Tensor:
        check_cut_gradient(g, self.max_grad_norm, "the client's gradient at the head's input")
        out, n = roundtrip(g, self.bits)
        self.bytes_up += n
        return out

    def metrics(self) -> dict:
        return {
            "cut_bytes_up": float(self.bytes_up),
            "cut_bytes_down": float(self.bytes_down),
            "cut_messages": float(self.messages),
        }


class _Cut(torch.autograd.Function):
    """Identity up to the exchange: forward is one message, backward the reply."""

    @staticmethod
    def forward(ctx, h, exchange: Exchange, upward: bool):
        ctx.exchange, ctx.upward = exchange, upward
        return exchange.client_to_server(h) if upward else exchange.server_to_client(h)

    @staticmethod
    def backward(ctx, g):
        e = ctx.exchange
        return (e.gradient_to_client(g) if ctx.upward else e.gradient_to_server(g)), None, None


@dataclass
class SplitCuts:
    """The cut hooks on a model: active only while a client trains (``exchange`` is set), so the
    server's evaluation runs the model whole."""

    cut_layer: int
    u_shaped: bool
    exchange: Exchange | None = None
    handles: list = field(default_factory=list)
    side: str = "client"  # whose part the forward pass is in (the cost meter's activations)
    server_modules: list = field(default_factory=list)  # the largest modules of the server's part
    model_modules: list = field(default_factory=list)

    def install(self, model: torch.nn.Module) -> None:
        from fedfm.models.layers import layer_list

        path, stack = layer_list(model)
        if not 1 <= self.cut_layer < len(stack):
            raise ModelError(
                f"split.cut_layer = {self.cut_layer}: the model has {len(stack)} layers; the cut must "
                f"leave at least one on each side (1..{len(stack) - 1})"
            )
        self.server_modules = server_part(model, path, self.cut_layer, self.u_shaped)
        self.model_modules = list(model.modules())
        self.handles.append(model.register_forward_pre_hook(self._start))
        self.handles.append(stack[self.cut_layer - 1].register_forward_hook(self._hook(upward=True)))
        if self.u_shaped:
            self.handles.append(stack[len(stack) - 1].register_forward_hook(self._hook(upward=False)))

    def _start(self, module, args):
        self.side = "client"

    def _hook(self, upward: bool):
        def hook(module, args, output):
            self.side = "server" if upward else "client"
            if self.exchange is None or not torch.is_grad_enabled():
                return output
            if isinstance(output, tuple):
                return (_Cut.apply(output[0], self.exchange, upward), *output[1:])
            return _Cut.apply(output, self.exchange, upward)

        return hook

    def server_parameters(self) -> set[int]:
        """Ids of the parameters only the server's part holds (a head tied to the embeddings the
        client runs is the client's too, so it is not counted here)."""
        inside = {id(m) for part in self.server_modules for m in part.modules()}
        theirs = {id(p) for m in self.server_modules for p in m.parameters()}
        mine = {id(p) for m in self.model_modules if id(m) not in inside for p in m.parameters(recurse=False)}
        return theirs - mine

    @contextlib.contextmanager
    def training(self, exchange: Exchange):
        self.exchange = exchange
        try:
            yield exchange
        finally:
            self.exchange = None


def server_part(model: torch.nn.Module, stack_path: str, cut_layer: int, u_shaped: bool) -> list:
    """The largest modules that run on the server: the stack's layers from the cut up, and
    (unless U-shaped) every module after the stack that contains no part of it (pooler, head)."""
    stack = model.get_submodule(stack_path)
    chosen = list(stack[cut_layer:])
    if u_shaped:
        return chosen
    order = [m for _, m in model.named_modules()]
    last = max(order.index(m) for m in stack.modules())
    inside = {id(m) for m in stack.modules()}
    taken: set[int] = set()
    for m in order[last + 1 :]:
        if id(m) in inside or id(m) in taken:
            continue
        chosen.append(m)
        taken.update(id(x) for x in m.modules())
    return chosen


def exchange_for(cfg, ctx, client_id: int) -> Exchange:
    s = cfg.split
    generator = None
    if s.activation_noise > 0:
        generator = (ctx.noise or NoiseSource()).generator(ctx.round, client_id, "split-noise")
    return Exchange(s.activation_bits, s.activation_noise, s.max_cut_grad_norm, generator)


def prepare_bundle(bundle, cfg) -> None:
    """Put the cut hooks on the clients' model."""
    cuts = SplitCuts(cfg.split.cut_layer, cfg.split.u_shaped)
    cuts.install(bundle.model)

    @contextlib.contextmanager
    def training(job, ctx):
        exchange = exchange_for(cfg, ctx, job.client_id)
        with cuts.training(exchange):
            metrics: dict = {}
            yield metrics
            metrics.update(exchange.metrics())

    bundle.training_context = training
    bundle.parts = cuts  # the cost meter tells the client's part from the server's


def check_split(cfg) -> None:
    from fedfm.engines.base import engine_traits
    from fedfm.privacy.guarantees import dp_mode
    from fedfm.registry import registry_for

    who = "sharing.mode = 'split'"
    if not registry_for("task").get(cfg.task.kind).layer_stack:
        raise ValueError(f"{who} cuts a transformer's layer stack; task.kind = {cfg.task.kind!r} has none")
    if cfg.peft.method not in ("lora", "full", "head"):
        raise ValueError(f"{who} trains LoRA, the head or every weight; peft.method = {cfg.peft.method!r}")
    if not engine_traits(cfg).in_process:
        raise ValueError(
            f"{who} is simulated in-process (run.engine = 'inprocess') or deployed with "
            "`fedfm server` (the per-batch exchange over gRPC, fedfm.sharing.split.server)"
        )
    if dp_mode(cfg).active or cfg.secagg.enabled:
        raise ValueError(
            f"{who}: the server's part trains on each client's activations every batch, which "
            "neither client-level DP of the round's update nor secure aggregation covers; turn "
            "privacy.dp and secagg.enabled off (split.activation_noise noises the activations)"
        )
    if not registry_for("protocol").get(cfg.run.protocol).rounds:
        raise ValueError(f"{who} runs federated rounds: run.protocol = 'rounds'")
    from fedfm.sharing.offsite import fm_num_layers

    try:
        num_layers = fm_num_layers(cfg.model)
    except ModelError:
        num_layers = None  # reported when the model is built
    if num_layers is not None and not 1 <= cfg.split.cut_layer < num_layers:
        raise ValueError(
            f"split.cut_layer = {cfg.split.cut_layer}: the model has {num_layers} layers; the cut must "
            f"leave at least one on each side (1..{num_layers - 1})"
        )
    if compresses(cfg) or registry_for("attack").get(cfg.attack.kind).acts:
        raise ValueError(
            f"{who}: compression.method and attack.kind act on a whole-model update; the cut has its "
            "own compression (split.activation_bits). Set them to 'none'"
        )


def describe(cfg) -> dict:
    s = cfg.split
    return {
        "mode": "split",
        "cut_layer": s.cut_layer,
        "u_shaped": s.u_shaped,
        "activation_bits": s.activation_bits,
        "activation_noise": s.activation_noise,
    }


def held(cfg):
    """θ → the part a split client holds and is sent each round: its bottom layers."""
    return functools.partial(client_part, cut_layer=cfg.split.cut_layer, u_shaped=cfg.split.u_shaped)


def _remote_client(cfg, data):
    from fedfm.sharing.split.client import client_bundle

    return client_bundle(cfg, data)


def _remote_server(cfg, bundle, task, label_names):
    from fedfm.sharing.split.server import SplitServer

    return SplitServer(cfg, bundle, task, label_names)


def _remote_check(cfg) -> None:
    from fedfm.sharing.split.server import check_remote

    check_remote(cfg)


class SplitSection(Section):
    """sharing.mode = "split": split fine-tuning (SplitFed-v1 rounds, docs/computation-sharing.md)."""

    cut_layer: int = Field(
        2, ge=1, description="The client runs the embeddings and layers 0..cut_layer-1; the server the rest."
    )
    u_shaped: bool = Field(
        False, description="The head runs on the client too (labels never leave it): two cuts per batch."
    )
    activation_bits: Literal[32, 16, 8] = Field(
        32, description="Bits per value of what crosses the cut (16: bfloat16; 8: int8, a scale per row)."
    )
    activation_noise: float = Field(
        0.0, ge=0, description="Std of Gaussian noise the client adds to the cut activations it sends."
    )
    max_cut_grad_norm: float | None = Field(
        None, gt=0, description="A client refuses a gradient at the cut with a larger L2 norm (per batch)."
    )


SHARING_MODES.register("split", options=SplitSection, section="split")(
    SharingMode(
        lambda cfg: cfg,
        lambda cfg, labels: None,
        check_split,
        describe,
        prepare_bundle,
        held=held,
        remote=RemoteHalves(_remote_client, _remote_server, _remote_check),
    )  # fmt: skip
)

"""Split fine-tuning's client half across processes: the bottom of the FM and the cut exchange.

The client builds only the bottom of the FM (its embeddings and layers ``0..cut_layer-1``, plus
the head when U-shaped; ``client_bundle``): the server's layers never reach it. At the cut its
forward pass sends the activations (Gaussian noise of std ``split.activation_noise`` added, then
encoded at ``split.activation_bits``) and, unless U-shaped, the labels and attention mask.

- **Plain split**: the server runs the top and the loss, steps its optimizer, and answers with
  the loss and the gradient at the cut; the client's backward pass starts from that gradient.
- **U-shaped**: the server answers with the last layer's hidden states; the client runs the head
  and the loss (labels stay here), sends the gradient at the head's input, and the server answers
  with the gradient at the cut. Two exchanges per batch.

What comes back is untrusted: the client checks every tensor's shape, dtype and finiteness and
the gradient's norm (``split.max_cut_grad_norm``) before it uses it (``received_*``). The
transport is a ``Link``'s ``send``; over gRPC it is ``fedfm.deploy.client.split_send``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from fedfm.seeding import NoiseSource
from fedfm.sharing.split.codec import SLACK, CutError, activation_limit, check_cut_gradient, decode, encode
from fedfm.sharing.split.payload import client_part, is_server_key
from fedfm.wire import WireError


def client_split_config(cfg):
    """The config of the model a split client builds: only the FM's bottom ``cut_layer`` layers
    (and no simulated cut: the exchange is real)."""
    from fedfm.sharing.offsite import fm_num_layers

    kept_fm = cfg.model.layers or list(range(fm_num_layers(cfg.model)))
    kept = list(kept_fm[: cfg.split.cut_layer])
    peft_layers = cfg.peft.layers
    if peft_layers is not None:
        peft_layers = [i for i in peft_layers if i in kept] or None
    return cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"layers": kept}),
            "peft": cfg.peft.model_copy(update={"layers": peft_layers}),
            "sharing": cfg.sharing.model_copy(update={"mode": "none"}),
        }
    )


class Reached(Exception):  # noqa: N818  (control flow: the forward pass ends at the cut)
    """Raised at the cut of a plain split: the server computed the loss; ``loss`` carries it."""

    def __init__(self, loss: torch.Tensor) -> None:
        super().__init__("the forward pass ended at the cut")
        self.loss = loss


class _ServerLoss(torch.autograd.Function):
    """The server's loss as a scalar of the client's graph: backward hands the server's gradient
    at the cut to the client's bottom layers."""

    @staticmethod
    def forward(ctx, h, loss: float, grad: torch.Tensor):
        ctx.save_for_backward(grad)
        return h.new_tensor(loss)

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return g * grad, None, None


class _ServerMiddle(torch.autograd.Function):
    """U-shaped: the server's layers as a function of the client's graph; backward is the second
    exchange (the gradient at the head's input up, the gradient at the cut back)."""

    @staticmethod
    def forward(ctx, h, top: torch.Tensor, cut: RemoteCut):
        ctx.cut = cut
        return top.to(h)

    @staticmethod
    def backward(ctx, g):
        return ctx.cut.backward_exchange(g), None, None


@dataclass
class Link:
    """One client's cut exchanges in one round: ``send(header, groups) → (header, groups)``."""

    send: object
    round: int
    micro: int = 0
    pending: tuple | None = None  # U-shaped: the shape of the top's hidden states awaiting a gradient


class RemoteCut:
    """The hook at the client's last layer that turns the forward pass into exchanges."""

    def __init__(self, cfg, stack) -> None:
        s = cfg.split
        self.bits, self.noise, self.max_norm, self.u_shaped = (
            s.activation_bits, s.activation_noise, s.max_cut_grad_norm, s.u_shaped
        )  # fmt: skip
        self.accum = cfg.training.grad_accumulation
        self.link: Link | None = None
        self.limit = SLACK
        self.generator: torch.Generator | None = None
        self.batch: dict | None = None
        stack[len(stack) - 1].register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if self.link is None or not torch.is_grad_enabled():
            return output
        h = output[0] if isinstance(output, tuple) else output
        sent = h.detach()
        if self.noise > 0:
            sent = sent + self.noise * torch.randn(sent.shape, generator=self.generator).to(sent)
        groups = {"h": encode(sent, self.bits), "m": {"mask": self.batch["attention_mask"].cpu()}}
        if not self.u_shaped:
            groups["y"] = {"labels": self.batch["labels"].cpu()}
        header, reply = self._exchange("forward", groups)
        if not self.u_shaped:
            loss = header.get("loss")
            if (
                isinstance(loss, bool)
                or not isinstance(loss, (int, float))
                or not torch.isfinite(torch.tensor(loss))
            ):
                raise CutError(f"the server's loss is not a finite number: {str(loss)[:40]}")
            grad = received_gradient(reply.get("g"), self.bits, tuple(h.shape), self.max_norm, 1 / self.accum)
            raise Reached(_ServerLoss.apply(h, float(loss), grad.to(h)))
        top = received_tensor(reply.get("h"), self.bits, tuple(h.shape), "the server's hidden states")
        self.link.pending = tuple(h.shape)
        out = _ServerMiddle.apply(h, top, self)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    def backward_exchange(self, g: torch.Tensor) -> torch.Tensor:
        shape, self.link.pending = self.link.pending, None
        _, reply = self._exchange("backward", {"g": encode(g, self.bits)})
        return received_gradient(reply.get("g"), self.bits, shape, self.max_norm).to(g)

    def _exchange(self, phase: str, groups: dict):
        link = self.link
        header = {"round": link.round, "micro": link.micro, "phase": phase}
        reply_header, reply = link.send(header, groups)
        if "error" in reply_header:
            raise CutError(f"the server refused the cut message: {str(reply_header['error'])[:300]}")
        if phase == "backward" or not self.u_shaped:  # the batch's exchange is complete
            link.micro += 1
        return reply_header, reply


def received_tensor(group, bits: int, shape: tuple, what: str) -> torch.Tensor:
    try:
        return decode(group, bits, shape, what)
    except WireError as err:
        raise CutError(str(err)) from None


def received_gradient(
    group, bits: int, shape: tuple, max_norm: float | None, scale: float = 1.0
) -> torch.Tensor:
    """The gradient at the cut the server sent, as the client accepts it (``CutError`` if not);
    its norm is checked after ``scale`` (1/grad_accumulation for a plain split's unscaled loss
    gradient, so the bound means what it means in the simulation)."""
    g = received_tensor(group, bits, shape, "the server's gradient at the cut")
    check_cut_gradient(g * scale, max_norm, "the server's gradient at the cut")
    return g


class RemoteTask:
    """The task whose loss a plain split's server computes: ``loss`` ends at the cut."""

    def __init__(self, task, cut: RemoteCut) -> None:
        self._task, self._cut = task, cut

    def __getattr__(self, name):
        return getattr(self._task, name)

    def loss(self, model, batch):
        self._cut.batch = batch
        try:
            return self._task.loss(model, batch)
        except Reached as reached:
            return reached.loss
        finally:
            self._cut.batch = None


def client_bundle(cfg, data):
    """(bundle, task, cut) of a deployed split client: the FM's bottom, its own tensors
    trainable, the cut hook on its last layer. Set ``cut.link`` to a ``Link`` while training."""
    from fedfm.models.layers import layer_list
    from fedfm.tasks.setup import build_task

    bundle, task = build_task(client_split_config(cfg), data)
    cut, u = cfg.split.cut_layer, cfg.split.u_shaped
    for k, p in bundle.trainable.items():
        if is_server_key(k, cut, u):
            p.requires_grad_(False)  # the server's (a plain split's head): never trained here
    bundle.trainable = client_part(bundle.trainable, cut, u)
    remote = RemoteCut(cfg, layer_list(bundle.model)[1])
    width = int(bundle.model.config.hidden_size)  # the most bytes a reply of the server may carry
    remote.limit = activation_limit(
        cfg.training.batch_size, cfg.model.max_length, width, cfg.split.activation_bits
    )
    bundle.parts = None
    bundle.training_context = _training_context(remote, cfg)
    return bundle, RemoteTask(task, remote), remote


def _training_context(remote: RemoteCut, cfg):
    @contextlib.contextmanager
    def training(job, ctx):
        if remote.link is None:
            raise CutError("split fine-tuning needs the server's cut exchange (no link set)")
        if cfg.split.activation_noise > 0:
            remote.generator = (ctx.noise or NoiseSource()).generator(ctx.round, job.client_id, "split-noise")
        yield {}

    return training

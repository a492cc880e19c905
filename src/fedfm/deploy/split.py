"""Split fine-tuning across processes: the per-batch cut exchange over gRPC (``SplitStep``).

The **client** builds only the bottom of the FM (its embeddings and layers ``0..cut_layer-1``,
plus the head when U-shaped; ``client_bundle``): the server's layers never reach it. At the cut
its forward pass sends the activations (Gaussian noise of std ``split.activation_noise`` added,
then encoded at ``split.activation_bits``) and, unless U-shaped, the labels and attention mask.

- **Plain split**: the server runs the top and the loss, steps its optimizer, and answers with
  the loss and the gradient at the cut; the client's backward pass starts from that gradient.
- **U-shaped**: the server answers with the last layer's hidden states; the client runs the head
  and the loss (labels stay here), sends the gradient at the head's input, and the server answers
  with the gradient at the cut. Two exchanges per batch.

What comes back is untrusted: the client checks every tensor's shape, dtype and finiteness and
the gradient's norm (``split.max_cut_grad_norm``) before it uses it (``received_*``).

The **server** (``SplitServer``) holds a private copy of the FM for the clients' sessions (the run's
own model keeps evaluating). A session is one client's round: its copy of the top part's
trainable tensors, started from the round's global state, and its own optimizer (SplitFed v1).
Forward passes run through ``torch.func.functional_call`` with the session's tensors, so
sessions never share a parameter. Each message is admitted before it is read (the caller is in
this round's cohort, the message is the next one its session expects, its bytes are bounded by
the batch size, the sequence length and the width of the cut) and checked after (shapes, dtypes,
finite values, labels in range, a 0/1 mask). When the client's update arrives, the server adds
its session's top-part delta and the cut bytes it counted itself (a client's own byte counts
are not trusted); a session that failed fails that client's update.

Differences from the simulation (``fedfm.sharing.split``), which trains both parts with one
optimizer: each side clips its own part (``training.max_grad_norm``), and the noise is drawn
before the encoding. Dropout draws differ (each side seeds its own), so runs match the
simulation exactly only without dropout.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace

import torch

from fedfm.deploy.wire import WireError, pack_tensors, unpack_tensors
from fedfm.seeding import NoiseSource, seed_torch
from fedfm.sharing.split import CutError, check_cut_gradient, int8_absmax
from fedfm.transforms.split import client_part, is_server_key
from fedfm.types import ClientFailure, ClientResult, Params, SplitUpdate

IGNORE = -100  # label of a token that carries no loss
SLACK = 64 << 10  # bytes a message may carry beyond its tensors (safetensors header)


# ----------------------------------------------------------------------------------------------
# the cut's tensors on the wire


def encode(t: torch.Tensor, bits: int) -> Params:
    """``t`` as it travels at ``bits`` per value: float32, bfloat16, or int8 with one float32
    absmax scale per row of the last axis (the simulation's ``roundtrip``, as real bytes)."""
    t = t.detach().float().cpu()
    if bits == 32:
        return {"v": t}
    if bits == 16:
        return {"v": t.to(torch.bfloat16)}
    q, scale = int8_absmax(t)
    return {"q": q, "s": scale}


def decode(group: Params | None, bits: int, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """The float32 tensor a received group encodes; ``WireError`` unless it is exactly what
    ``encode`` makes for a tensor of ``shape`` at ``bits``, with finite values."""
    group = group or {}
    want = {32: {"v": torch.float32}, 16: {"v": torch.bfloat16}, 8: {"q": torch.int8, "s": torch.float32}}[
        bits
    ]
    if set(group) != set(want):
        raise WireError(f"{what}: expected tensors {sorted(want)}, got {sorted(group)[:4]}")
    for name, dtype in want.items():
        if group[name].dtype != dtype:
            raise WireError(f"{what}: {name} is {group[name].dtype}, expected {dtype} at {bits} bits")
    main = group.get("v", group.get("q"))
    if tuple(main.shape) != tuple(shape):
        raise WireError(f"{what}: shape {tuple(main.shape)}, expected {tuple(shape)}")
    if bits == 8:
        if tuple(group["s"].shape) != (*shape[:-1], 1):
            raise WireError(f"{what}: scale shape {tuple(group['s'].shape)}, expected {(*shape[:-1], 1)}")
        out = group["q"].float() * group["s"]
    else:
        out = main.float()
    if not torch.isfinite(out).all():
        raise WireError(f"{what} holds non-finite values")
    return out


def activation_limit(batch_size: int, max_length: int, width: int, bits: int = 32) -> int:
    """The most bytes a cut message may carry: activations (or a gradient) of a full batch at
    ``bits`` per value (int8: with a float32 scale per token), the mask and the labels as int64,
    and header slack."""
    tokens = batch_size * max_length
    values = tokens * width * bits // 8 + (4 * tokens if bits == 8 else 0)
    return values + 2 * tokens * 8 + SLACK


# ----------------------------------------------------------------------------------------------
# the client's side


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


def grpc_send(stub, metadata, deadline: float, limit: int):
    """``send`` of a ``Link`` over the ``SplitStep`` RPC; no call outlives ``deadline`` (a
    ``time.monotonic()`` instant: the round's deadline)."""
    import time

    from fedfm.deploy import fedfm_pb2 as pb
    from fedfm.deploy.wire import chunks, join

    def send(header: dict, groups: dict):
        blob = pack_tensors(groups)
        stream = (pb.Chunk(header=t, data=d) for t, d in chunks(header, blob))
        left = deadline - time.monotonic()
        if left <= 0:
            raise CutError("the round's deadline passed during the cut exchange")
        replies = stub.SplitStep(stream, metadata=metadata, timeout=left)
        try:
            reply_header, reply = join(((c.header, c.data) for c in replies), max_bytes=limit)
            return reply_header, unpack_tensors(reply)
        except WireError as err:
            raise CutError(f"the server's cut reply is malformed: {err}") from None

    return send


# ----------------------------------------------------------------------------------------------
# the server's side


class _Stop(Exception):  # noqa: N818  (control flow: the server's forward ends at its top)
    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("the server's part ends here")
        self.hidden = hidden


@dataclass
class Session:
    """One client's round on the server: its top-part tensors, optimizer and cut traffic."""

    client_id: int
    params: dict[str, torch.Tensor]  # parameter name → the session's own leaf
    optimizer: torch.optim.Optimizer
    micro: int = 0  # cut exchanges completed (a U-shaped batch completes with its backward)
    graph: tuple | None = None  # U-shaped: (leaf at the cut, top's hidden states) between calls
    failed: str | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    messages: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class SplitServer:
    """The server's part of split fine-tuning over gRPC: sessions of the round's cohort."""

    def __init__(self, cfg, bundle, task, label_names) -> None:
        import copy

        from fedfm.models.layers import layer_list
        from fedfm.models.state import trainable_parameters

        s = cfg.split
        self.cfg, self.task = cfg, task
        self.cut, self.u_shaped, self.bits, self.max_norm = (
            s.cut_layer,
            s.u_shaped,
            s.activation_bits,
            s.max_cut_grad_norm,
        )
        self.model = copy.deepcopy(bundle.model)  # sessions' own: the run's model keeps evaluating
        self.model.train()
        self.device = bundle.device
        names = {id(p): n for n, p in self.model.named_parameters()}
        live = trainable_parameters(self.model)
        self.names = {k: names[id(p)] for k, p in live.items() if is_server_key(k, self.cut, self.u_shaped)}
        for p in self.model.parameters():
            p.requires_grad_(False)  # only the sessions' own leaves train
        path, stack = layer_list(self.model)
        self.width = int(self.model.config.hidden_size)
        self.num_labels = len(label_names) if cfg.task.kind == "classification" else None
        self.vocab = int(self.model.config.vocab_size)
        self.pad_id = int(getattr(self.model.config, "pad_token_id", None) or 0)
        for layer in stack[: self.cut]:
            _pass_through(layer)
        self.local = threading.local()  # the received activations of the call this thread serves
        stack[self.cut - 1].register_forward_hook(self._at_cut)
        if self.u_shaped:
            stack[len(stack) - 1].register_forward_hook(self._at_top)
        self.lock = threading.Lock()  # functional_call swaps the copy's parameters for a call
        self.sessions: dict[int, Session] = {}
        self.round, self.seed, self.start, self.open = 0, cfg.run.seed, {}, set()
        t = cfg.training
        self.limit = activation_limit(t.batch_size, cfg.model.max_length, self.width, self.bits)
        self.max_micro = t.local_steps * t.grad_accumulation if t.local_steps else None

    # the engine's calls, from the round loop's thread

    def open_round(self, global_params: Params, cohort, ctx) -> Params:
        """Start the round: sessions will start from ``global_params``; returns what clients are sent."""
        with self.lock:
            self.round, self.seed = ctx.round, ctx.seed
            self.start = {k: global_params[k] for k in self.names}
            self.open, self.sessions = set(cohort), {}
        return client_part(global_params, self.cut, self.u_shaped)

    def attach(self, result: ClientResult) -> ClientResult:
        """A client's result with the server's part added, or a failure naming why not."""
        k = result.client_id
        with self.lock:
            session = self.sessions.pop(k, None)
        if result.failure is not None:
            return result
        update, why = result.update, None
        if not isinstance(update, SplitUpdate):
            kind = getattr(update, "kind", type(update).__name__)
            why = f"sent a {kind!r} payload; split clients send 'split'"
        elif session is not None and session.failed:
            why = f"its cut exchange failed: {session.failed}"
        elif session is None or session.micro == 0:
            why = "sent an update without training through the cut this round"
        if why:
            return ClientResult(k, failure=ClientFailure(k, "split", why))
        server = {
            key: session.params[name].detach().cpu() - self.start[key] for key, name in self.names.items()
        }
        metrics = {
            **update.metrics,
            "cut_bytes_up": float(session.bytes_up),
            "cut_bytes_down": float(session.bytes_down),
            "cut_messages": float(session.messages),
        }
        return dc_replace(result, update=dc_replace(update, server_delta=server, metrics=metrics))

    def close_round(self) -> None:
        with self.lock:
            self.open, self.sessions = set(), {}

    # the handlers' calls, from gRPC threads

    def admit(self, client_id: int, header: dict) -> int:
        """The byte limit of a cut message from ``client_id``; ``ValueError`` if it is not expected."""
        rnd, phase, micro = header.get("round"), header.get("phase"), header.get("micro")
        with self.lock:
            if rnd != self.round or client_id not in self.open:
                raise ValueError(f"not expecting a cut message for round {str(rnd)[:20]} from you")
            session = self.sessions.get(client_id)
        if phase not in ("forward", "backward") or (phase == "backward" and not self.u_shaped):
            raise ValueError(f"unknown cut phase {str(phase)[:20]!r}")
        if session is not None and session.failed:
            raise ValueError(f"this round's cut exchange already failed: {session.failed}")
        expected = session.micro if session is not None else 0
        if isinstance(micro, bool) or micro != expected:
            raise ValueError(f"cut message {str(micro)[:20]} out of order (expected {expected})")
        if self.max_micro is not None and micro >= self.max_micro:
            raise ValueError(f"more than {self.max_micro} batches this round (training.local_steps)")
        return self.limit

    def step(self, client_id: int, header: dict, groups: Params, received: int) -> tuple[dict, dict]:
        """One exchange of ``client_id``'s session: the reply header and tensor groups. A malformed
        message fails the session (and so the client's round) with the reason."""
        session = self._session(client_id, header.get("round"))
        with session.lock:  # one exchange at a time per client, in order
            try:
                if session.failed:
                    raise WireError(f"this round's cut exchange already failed: {session.failed}")
                micro = header.get("micro")
                if isinstance(micro, bool) or micro != session.micro:
                    raise WireError(f"cut message {str(micro)[:20]} out of order (expected {session.micro})")
                if self.max_micro is not None and micro >= self.max_micro:
                    raise WireError(f"more than {self.max_micro} batches (training.local_steps) this round")
                session.bytes_up += received
                session.messages += 1
                if header["phase"] == "backward":
                    reply = self._backward(session, groups)
                elif self.u_shaped:
                    reply = self._forward_u(session, groups)
                else:
                    reply = self._forward_loss(session, groups)
            except (WireError, ValueError) as err:
                session.failed, session.graph = str(err)[:300], None
                return {"error": session.failed}, {}
            except Exception as err:  # the server's own failure on this message: the session ends
                session.failed, session.graph = f"the server could not run it ({type(err).__name__})", None
                return {"error": session.failed}, {}
            header_out, tensors = reply
            session.bytes_down += len(pack_tensors(tensors))
            return header_out, tensors

    def _session(self, client_id: int, rnd) -> Session:
        from fedfm.client.program import make_optimizer

        with self.lock:  # a message admitted in one round never opens a session of the next
            if rnd != self.round or client_id not in self.open:
                raise ValueError("the round is closed")
            if client_id not in self.sessions:
                params = {
                    name: self.start[key].to(self.device).clone().requires_grad_(True)
                    for key, name in self.names.items()
                }
                optimizer = make_optimizer(list(params.values()), self.cfg.training)
                self.sessions[client_id] = Session(client_id, params, optimizer)
            return self.sessions[client_id]

    def _inputs(self, groups: Params) -> tuple[torch.Tensor, dict]:
        """The received activations and the batch the server's part runs on (ids it never sees are
        zeros: its copy of the bottom layers passes the activations through)."""
        mask = (groups.get("m") or {}).get("mask")
        if mask is None or mask.dim() != 2 or mask.dtype not in (torch.int64, torch.int32, torch.bool):
            raise WireError("the attention mask must be an integer [batch, tokens] tensor")
        b, t = mask.shape
        if not (1 <= b <= self.cfg.training.batch_size and 1 <= t <= self.cfg.model.max_length):
            raise WireError(f"batch shape {(b, t)} outside training.batch_size × model.max_length")
        if not ((mask == 0) | (mask == 1)).all() or (mask.sum(1) == 0).any():
            raise WireError("the attention mask must be 0/1 with at least one token per row")
        h = decode(groups.get("h"), self.bits, (b, t, self.width), "the activations")
        # the server never sees the ids; stand-ins keep the padding where it is, because a decoder's
        # classifier reads the last token that is not padding
        pad = self.pad_id
        ids = torch.where(mask.bool(), torch.full((b, t), (pad + 1) % self.vocab), torch.full((b, t), pad))
        batch = {"input_ids": ids, "attention_mask": mask.long()}
        if not self.u_shaped:
            batch["labels"] = self._labels(groups, b, t)
        return h, {k: v.to(self.device) for k, v in batch.items()}

    def _labels(self, groups: Params, b: int, t: int) -> torch.Tensor:
        y = (groups.get("y") or {}).get("labels")
        if y is None or y.dtype not in (torch.int64, torch.int32):
            raise WireError("the labels must be an integer tensor")
        if self.num_labels is not None:
            if tuple(y.shape) != (b,) or not ((y >= 0) & (y < self.num_labels)).all():
                raise WireError(f"the labels must be {b} class indices in [0, {self.num_labels})")
        elif tuple(y.shape) != (b, t) or not ((y == IGNORE) | ((y >= 0) & (y < self.vocab))).all():
            raise WireError(f"the labels must be [{b}, {t}] token ids or {IGNORE}")
        return y.long()

    def _run(self, session: Session, h: torch.Tensor, call):
        """``call(model)`` on the copy with the session's tensors and ``h`` at the cut, seeded."""
        from torch.func import functional_call

        leaf = h.to(self.device).requires_grad_(True)
        model = _Bound(self.model, session.params, functional_call)
        devices = [self.device] if torch.device(self.device).type == "cuda" else []
        with self.lock, torch.random.fork_rng(devices=devices):
            seed_torch(self.seed, self.round, session.client_id, "split-server", session.micro)
            self.local.h = leaf
            try:
                out = call(model)
            except _Stop as stop:
                out = stop.hidden
            finally:
                self.local.h = None
        return leaf, out

    def _forward_loss(self, session: Session, groups: Params):
        h, batch = self._inputs(groups)
        leaf, loss = self._run(session, h, lambda model: self.task.loss(model, batch))
        if not torch.isfinite(loss):
            raise ValueError("the server's loss is not finite on these activations")
        accum = self.cfg.training.grad_accumulation
        (loss / accum).backward()
        grad = leaf.grad * accum
        self._finish_batch(session)
        return {"loss": float(loss.detach())}, {"g": encode(grad, self.bits)}

    def _forward_u(self, session: Session, groups: Params):
        if session.graph is not None:
            raise WireError("a forward message while the last batch's gradient is awaited")
        h, batch = self._inputs(groups)
        leaf, top = self._run(session, h, lambda model: model(**batch))
        session.graph = (leaf, top)
        return {}, {"h": encode(top, self.bits)}

    def _backward(self, session: Session, groups: Params):
        if session.graph is None:
            raise WireError("a gradient message without a forward message before it")
        leaf, top = session.graph
        g = decode(groups.get("g"), self.bits, tuple(top.shape), "the gradient at the head's input")
        check_cut_gradient(g, self.max_norm, "the client's gradient at the head's input")
        top.backward(g.to(top))
        session.graph = None
        grad = leaf.grad
        self._finish_batch(session)
        return {}, {"g": encode(grad, self.bits)}

    def _finish_batch(self, session: Session) -> None:
        session.micro += 1
        t = self.cfg.training
        if session.micro % t.grad_accumulation:
            return
        params = list(session.params.values())
        if t.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        session.optimizer.step()
        session.optimizer.zero_grad(set_to_none=True)

    def _at_cut(self, module, args, output):
        h = getattr(self.local, "h", None)
        if h is None:
            return output
        return (h, *output[1:]) if isinstance(output, tuple) else h

    def _at_top(self, module, args, output):
        if getattr(self.local, "h", None) is None:
            return output
        raise _Stop(output[0] if isinstance(output, tuple) else output)


class _Bound:
    """The model called with a session's tensors (what ``task.loss(model, batch)`` calls)."""

    def __init__(self, model, params, functional_call) -> None:
        self.model, self.params, self.functional_call = model, params, functional_call

    def __call__(self, *args, **kwargs):
        return self.functional_call(self.model, self.params, args, kwargs, strict=False)

    def __getattr__(self, name):
        return getattr(self.model, name)


def _pass_through(layer: torch.nn.Module) -> None:
    """Make ``layer`` return its input hidden states (in its own output format, learnt from one
    real call): the server's copy never runs the client's layers."""
    original = layer.forward
    form: dict = {}

    def forward(*args, **kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        if "tuple" not in form:
            with torch.no_grad():
                out = original(*args, **kwargs)
            form["tuple"], form["rest"] = (
                isinstance(out, tuple),
                len(out) - 1 if isinstance(out, tuple) else 0,
            )
        return (h, *([None] * form["rest"])) if form["tuple"] else h

    layer.forward = forward

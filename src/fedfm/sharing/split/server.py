"""Split fine-tuning's server half across processes: the sessions of a round's cohort.

The server (``SplitServer``) holds a private copy of the FM for the clients' sessions (the run's
own model keeps evaluating). A session is one client's round: its copy of the top part's
trainable tensors, started from the round's global state, and its own optimizer (SplitFed v1).
Forward passes run through ``torch.func.functional_call`` with the session's tensors, so
sessions never share a parameter. Each message is admitted before it is read (the caller is in
this round's cohort, the message is the next one its session expects, its bytes are bounded by
the batch size, the sequence length and the width of the cut) and checked after (shapes, dtypes,
finite values, labels in range, a 0/1 mask). When the client's update arrives, the server adds
its session's top-part delta and the cut bytes it counted itself (a client's own byte counts
are not trusted); a session that failed fails that client's update.

Differences from the simulation (``fedfm.sharing.split.mode``), which trains both parts with one
optimizer: each side clips its own part (``training.max_grad_norm``), and the noise is drawn
before the encoding. Dropout draws differ (each side seeds its own), so runs match the
simulation exactly only without dropout.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace

import torch

from fedfm.seeding import seed_torch
from fedfm.sharing.split.codec import IGNORE, activation_limit, check_cut_gradient, decode, encode
from fedfm.sharing.split.payload import client_part, is_server_key
from fedfm.tasks.base import task_kind
from fedfm.types import ClientFailure, ClientResult, Params, SplitUpdate
from fedfm.wire import WireError, pack_tensors


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
        self.num_labels = len(label_names) if task_kind(cfg).has_head else None
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
        from fedfm.client.program import make_optimizer, round_lr, scheduled_training

        with self.lock:  # a message admitted in one round never opens a session of the next
            if rnd != self.round or client_id not in self.open:
                raise ValueError("the round is closed")
            if client_id not in self.sessions:
                params = {
                    name: self.start[key].to(self.device).clone().requires_grad_(True)
                    for key, name in self.names.items()
                }
                training = scheduled_training(self.cfg)  # the clients' schedule
                optimizer = make_optimizer(list(params.values()), training, round_lr(training, rnd))
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


def check_remote(cfg) -> None:
    """What the deployed exchange cannot run (``ValueError`` naming the field): the server's
    session trains its part with the plain objective at one rank, and does not follow a base that
    changes every round."""
    from fedfm.algorithms.lora import LORA_AGGREGATION
    from fedfm.algorithms.objectives import make_objective

    if not make_objective(cfg.strategy).plain or cfg.peft.rank_tiers:
        raise ValueError(
            "sharing.mode = 'split' over gRPC trains the server's part with the plain objective "
            "at one rank: set strategy.objective = 'plain' and leave peft.rank_tiers unset"
        )
    if cfg.training.count_costs:
        raise ValueError("training.count_costs measures split fine-tuning in simulation only")
    if LORA_AGGREGATION.get(cfg.strategy.lora_aggregation).merges_into_base:
        raise ValueError(
            f"sharing.mode = 'split' over gRPC: strategy.lora_aggregation = "
            f"{cfg.strategy.lora_aggregation!r} merges into the base every round, which the server's "
            "session copy and the clients' bottoms do not follow"
        )

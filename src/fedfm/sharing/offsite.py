"""Offsite tuning (Xiao et al. 2023): clients tune adapters on an emulator, never the full FM.

The server keeps the foundation model. The **emulator** is the FM with its bottom and top
``offsite.adapter_layers`` layers kept as the trainable *adapter* and its middle thinned by
uniform layer drop to ``offsite.emulator_layers`` evenly spaced layers (frozen). Clients fine-tune
the adapter (LoRA on it, or every weight of it with ``peft.method = "full"``) and the head on the
emulator; the server aggregates the adapter as usual and **plugs it into the full FM** (the same
layers at their FM indices) to evaluate and export it. The emulator's own accuracy is recorded
beside the plug-in's (``emulator_test_*``).

The emulator here is not distilled: its middle layers are the FM's own (a subset), so it costs no
server training and uses no data; see docs/computation-sharing.md for what that costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field

from fedfm.config.sections import Section
from fedfm.models.build import ModelBundle
from fedfm.models.resolve import ModelError
from fedfm.sharing.base import SHARING_MODES, SharingMode
from fedfm.types import Params


@dataclass(frozen=True)
class EmulatorPlan:
    """Which FM layers the emulator keeps (in order) and which of them are the adapter."""

    num_layers: int
    kept: tuple[int, ...]
    adapter: tuple[int, ...]

    @property
    def positions(self) -> dict[int, int]:
        """Emulator position → FM layer index."""
        return dict(enumerate(self.kept))


def emulator_plan(num_layers: int, adapter_layers: int, emulator_layers: int | None) -> EmulatorPlan:
    """Bottom and top ``adapter_layers`` layers, and ``emulator_layers`` of the middle ones evenly
    spaced, first and last middle layers included (default: half of the middle, rounded up)."""
    k = adapter_layers
    if 2 * k > num_layers:
        raise ModelError(
            f"offsite.adapter_layers = {k} takes {2 * k} layers (bottom and top); the FM has {num_layers}"
        )
    middle = list(range(k, num_layers - k))
    m = len(middle)
    keep = (m + 1) // 2 if emulator_layers is None else emulator_layers
    if keep > m:
        raise ModelError(f"offsite.emulator_layers = {keep}: the FM has {m} middle layers")
    if keep == 1:
        chosen = [middle[(m - 1) // 2]]
    else:
        chosen = [middle[round(i * (m - 1) / (keep - 1))] for i in range(keep)] if keep else []
    bottom, top = list(range(k)), list(range(num_layers - k, num_layers))
    return EmulatorPlan(num_layers, tuple(bottom + chosen + top), tuple(bottom + top))


# the packaged models' layer counts (ASSETS.md): known without loading (SmolLM2's config would
# otherwise come from dequantising its GGUF file)
PACKAGED_LAYERS = {"minilm": 6, "smollm2-135m": 30}


def fm_num_layers(model_cfg) -> int:
    """The number of layers of the FM named by ``model_cfg``, from its config (no weights)."""
    import json
    from pathlib import Path

    from transformers import AutoConfig

    from fedfm.models.resolve import load_error, resolve_model

    name = model_cfg.name
    if name in PACKAGED_LAYERS:
        return PACKAGED_LAYERS[name]
    config_file = Path(name).expanduser() / "config.json"
    if config_file.is_file():
        raw = json.loads(config_file.read_text())
        n = raw.get("num_hidden_layers", raw.get("n_layer"))
    else:
        try:
            n = getattr(AutoConfig.from_pretrained(resolve_model(name)), "num_hidden_layers", None)
        except Exception as err:
            raise load_error(name, err) from None
    if not isinstance(n, int):
        raise ModelError(f"model {name!r}: its config gives no num_hidden_layers")
    return n


def plan_of(cfg) -> EmulatorPlan:
    o = cfg.offsite
    return emulator_plan(fm_num_layers(cfg.model), o.adapter_layers, o.emulator_layers)


def _with(cfg, model_layers, peft_layers):
    return cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"layers": model_layers}),
            "peft": cfg.peft.model_copy(update={"layers": peft_layers}),
            "sharing": cfg.sharing.model_copy(update={"mode": "none"}),
        }
    )


def emulator_config(cfg):
    """What clients train: the emulator's layers, with the adapter's adapted."""
    plan = plan_of(cfg)
    return _with(cfg, list(plan.kept), list(plan.adapter))


def plugin_config(cfg):
    """What the server evaluates: the full FM with the adapter's layers adapted."""
    return _with(cfg, None, list(plan_of(cfg).adapter))


@dataclass
class ServerModel:
    """The model the server evaluates and exports, and how a client payload's keys map onto it."""

    bundle: ModelBundle
    stack: str  # the layer stack's name in payload keys
    positions: dict[int, int]  # the clients' model's layer position → the FM's layer index
    plan: EmulatorPlan

    def params(self, state: Params) -> Params:
        from fedfm.models.layers import rename_layers

        return rename_layers(state, self.stack, self.positions)


def server_model(cfg, label_names) -> ServerModel:
    from fedfm.models.layers import layer_list
    from fedfm.tasks.setup import build_bundle

    bundle = build_bundle(plugin_config(cfg), label_names)
    stack, _ = layer_list(bundle.model)
    plan = plan_of(cfg)
    return ServerModel(bundle, stack, plan.positions, plan)


def middle_output(model, batch: dict, position: int) -> torch.Tensor:
    """The hidden states after layer ``position`` of ``model``'s stack (non-pad tokens only)."""
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
    )
    mask = batch["attention_mask"].bool()
    return out.hidden_states[position + 1][mask]


def distill_emulator(emulator, fm, plan: EmulatorPlan, texts: list[str], cfg) -> dict:
    """Train the emulator's kept middle layers so that its hidden states after them match the
    FM's after the FM's last middle layer (mean squared error over tokens), on public or
    synthetic texts only, for ``offsite.distill_steps`` AdamW steps; seeded, so a resumed run
    distils the same emulator again. Returns the loss before and after."""
    from fedfm.client.steps import batch_order
    from fedfm.models.layers import layer_list
    from fedfm.seeding import seed_torch, torch_generator

    o, k = cfg.offsite, cfg.offsite.adapter_layers
    _, stack = layer_list(emulator.model)
    middle = list(stack)[k : len(plan.kept) - k]
    if not middle:
        raise ModelError("offsite.distill_steps: the emulator keeps no middle layer to distil")
    student_at, teacher_at = len(plan.kept) - k - 1, plan.num_layers - k - 1
    enc = emulator.tokenizer(texts, truncation=True, max_length=cfg.model.max_length, padding="max_length",
                             return_tensors="pt")  # fmt: skip
    params = [p for layer in middle for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=o.distill_lr)
    seed_torch(cfg.run.seed, "offsite-distill")
    order = batch_order(
        len(texts), cfg.training.batch_size, o.distill_steps, torch_generator(cfg.run.seed, "distill")
    )
    emulator.model.eval()  # no dropout: the target is the FM's deterministic output
    fm.model.eval()
    losses = []
    try:
        for rows in order:
            width = int(enc["attention_mask"][rows].sum(1).max())
            batch = {
                k: v[rows, :width].to(emulator.device)
                for k, v in enc.items()
                if k in ("input_ids", "attention_mask")
            }
            with torch.no_grad():
                target = middle_output(fm.model, batch, teacher_at)
            loss = torch.nn.functional.mse_loss(middle_output(emulator.model, batch, student_at), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    return {"event": "distill", "steps": o.distill_steps, "loss_first": losses[0], "loss_last": losses[-1],
            "texts": len(texts)}  # fmt: skip


def distilled_layers(cfg) -> list[int]:
    """Positions in the emulator of the middle layers that distillation trains."""
    k = cfg.offsite.adapter_layers
    return list(range(k, len(plan_of(cfg).kept) - k))


def emulator_weights(emulator, cfg) -> dict[str, torch.Tensor]:
    """The distilled middle layers' weights, keyed ``"<position>.<name in the layer>"``: what a
    deployed client cannot build from the FM's files (``load_emulator_weights`` reads them)."""
    from fedfm.models.layers import layer_list

    _, stack = layer_list(emulator.model)
    return {
        f"{i}.{name}": t.detach().cpu().contiguous()
        for i in distilled_layers(cfg)
        for name, t in stack[i].state_dict().items()
    }


def load_emulator_weights(emulator, cfg, weights) -> None:
    """Put the server's distilled middle layers into a client's emulator, after checking that
    they are exactly those layers' tensors (names, shapes, dtypes) with finite values; a
    ``ValueError`` says what is wrong and nothing is loaded."""
    from fedfm.models.layers import layer_list

    _, stack = layer_list(emulator.model)
    own = {f"{i}.{name}": t for i in distilled_layers(cfg) for name, t in stack[i].state_dict().items()}
    if set(weights) != set(own):
        extra, missing = sorted(set(weights) - set(own)), sorted(set(own) - set(weights))
        raise ValueError(f"the emulator weights do not match its middle layers (unexpected "
                         f"{extra[:3]}, missing {missing[:3]})")  # fmt: skip
    for key, t in weights.items():
        if t.shape != own[key].shape or t.dtype != own[key].dtype:
            raise ValueError(f"emulator weight {key}: {tuple(t.shape)} {t.dtype}, expected "
                             f"{tuple(own[key].shape)} {own[key].dtype}")  # fmt: skip
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"emulator weight {key} holds non-finite values")
    with torch.no_grad():
        for key, t in weights.items():
            own[key].copy_(t)


def prepare_run(cfg, bundle, server_model, held_out, console) -> dict | None:
    """Before round 1 (and again on resume, identically): distil the emulator (``bundle``, the
    clients' model) from the FM (``server_model``) on the distillation texts less ``held_out``
    (the test texts), if asked; → the distillation's record, or None."""
    if cfg.offsite.distill_steps == 0:
        return None
    from fedfm.data.sources import read_texts

    texts = read_texts(cfg.offsite.distill_path or cfg.synthetic.path)
    held = set(held_out)
    texts = [t for t in dict.fromkeys(texts) if t not in held]
    with console.status(f"distilling the emulator on {len(texts)} texts"):
        record = distill_emulator(bundle, server_model.bundle, server_model.plan, texts, cfg)
    console.note(
        f"emulator distilled: {record['steps']} steps on {len(texts)} texts, MSE "
        f"{record['loss_first']:.4f} → {record['loss_last']:.4f}"
    )
    return record


def describe(cfg) -> dict:
    plan = plan_of(cfg)
    return {
        "mode": "offsite",
        "fm_layers": plan.num_layers,
        "emulator_layers": list(plan.kept),
        "adapter_layers": list(plan.adapter),
    }


def check_offsite(cfg) -> None:
    from fedfm.algorithms.lora import LORA_AGGREGATION
    from fedfm.engines.base import engine_traits
    from fedfm.registry import registry_for

    who = "sharing.mode = 'offsite'"
    if not registry_for("task").get(cfg.task.kind).layer_stack:
        raise ValueError(f"{who} thins a transformer's layer stack; task.kind = {cfg.task.kind!r} has none")
    if cfg.peft.method not in ("lora", "full"):
        raise ValueError(
            f"{who} tunes the adapter layers with LoRA, or every weight of them with 'full'; "
            f"peft.method = {cfg.peft.method!r} does not"
        )
    for field, value in (("model.layers", cfg.model.layers), ("peft.layers", cfg.peft.layers)):
        if value is not None:
            raise ValueError(f"{who} chooses the layers itself (offsite.*); leave {field} unset")
    if cfg.task.baselines:
        raise ValueError(
            f"{who}: the baselines would train and score the emulator, not the plug-in; "
            "set task.baselines = false"
        )
    if LORA_AGGREGATION.get(cfg.strategy.lora_aggregation).merges_into_base:
        raise ValueError(
            f"{who}: strategy.lora_aggregation = {cfg.strategy.lora_aggregation!r} merges updates into "
            "the clients' base, the emulator, which the server's FM does not share"
        )
    if not registry_for("protocol").get(cfg.run.protocol).rounds:
        raise ValueError(f"{who} runs federated rounds: run.protocol = 'rounds'")
    if cfg.offsite.distill_steps:
        if not (cfg.offsite.distill_path or cfg.synthetic.path):
            raise ValueError(
                "offsite.distill_steps needs texts to distil on: offsite.distill_path (public texts or "
                "`fedfm synth` output) or synthetic.path; never client data"
            )
        if not engine_traits(cfg).in_process:
            raise ValueError(
                f"offsite.distill_steps: the distilled emulator lives in this process; run.engine = "
                f"{cfg.run.engine!r} builds clients' models elsewhere (use 'inprocess')"
            )
    try:
        num_layers = fm_num_layers(cfg.model)
    except ModelError:
        return  # a model that cannot be read is reported when it is built
    emulator_plan(num_layers, cfg.offsite.adapter_layers, cfg.offsite.emulator_layers)  # names the field


def shipped_emulator(bundle, cfg):
    """What a deployed client fetches beside the global state: the distilled middle layers, when
    the emulator is distilled (``offsite.distill_steps``); else None."""
    return emulator_weights(bundle, cfg) if cfg.offsite.distill_steps else None


class OffsiteSection(Section):
    """sharing.mode = "offsite": offsite tuning (Xiao et al. 2023) on an emulator of the FM."""

    adapter_layers: int = Field(
        1, ge=1, description="Layers at the bottom and at the top (each) that clients tune: the adapter."
    )
    emulator_layers: int | None = Field(
        None,
        ge=0,
        description="Middle layers the emulator keeps, evenly spaced (uniform layer drop); default: half "
        "of the middle, rounded up. All of them: the emulator is the FM.",
    )
    distill_steps: int = Field(
        0,
        ge=0,
        description="Server steps distilling the emulator's middle into the FM's before round 1 (0: none).",
    )
    distill_path: str | None = Field(
        None,
        description="Texts to distil on (JSONL/CSV 'text': public or `fedfm synth`); default synthetic.path.",
    )
    distill_lr: float = Field(1e-4, gt=0, description="AdamW learning rate of the emulator's distillation.")


SHARING_MODES.register("offsite", options=OffsiteSection, section="offsite")(
    SharingMode(
        emulator_config,
        server_model,
        check_offsite,
        describe,
        prepare_run=prepare_run,
        client_weights=shipped_emulator,
    )  # fmt: skip
)

"""Image classification: a pretrained (or random) image backbone, cross-entropy, accuracy/F1.

Any Hugging Face ``AutoModelForImageClassification`` (ViT, ConvNeXt, ResNet, EfficientNet, ...)
or the packaged EfficientNet-Lite0 (``fedfm.models.vision``). Images stay uint8 at their stored
size; each batch is resized to ``model.image_size`` (bilinear, antialiased), grey images
become three equal channels, pixels are normalised with the backbone's mean and std, and with
``data.augment`` a random crop (pad 1/8 of the side, reflect) and horizontal flip are drawn from
the client's torch generator (seeded per client and round, as dropout is).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedfm.data.images import ImageDataset
from fedfm.tasks.classification import (
    ClassificationMetrics,
    classify_loss,
    evaluate_classifier,
    segment_classify_losses,
)


@dataclass(frozen=True)
class Pixels:
    """Images as a uint8 tensor ``[N, C, H, W]`` with their labels."""

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def of(cls, data: ImageDataset) -> Pixels:
        images = torch.from_numpy(np.ascontiguousarray(data.images)).permute(0, 3, 1, 2).contiguous()
        return cls(images, torch.as_tensor(data.labels, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.labels)


class ImageTask:
    """Batches, loss and evaluation for one image train set and test set."""

    name = "image_classification"

    def __init__(self, train: Pixels, test: Pixels, num_labels: int, preprocessing, **options) -> None:
        self.train, self.test, self.num_labels = train, test, num_labels
        self.size = preprocessing.size
        self.mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
        self.augment = options.get("augment", False)
        self.forward_kwargs = options.get("forward_kwargs", {})
        self.patch_size = options.get("patch_size", 3)
        self.backdoor = options.get("backdoor", False)
        self.pad: dict = {}  # fixed-size rows: a combined batch needs no padding

    # ------------------------------------------------------------ pixels
    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, C, H, W]`` → [0, 1] float ``[B, 3, size, size]``."""
        x = images.float() / 255.0
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
            )
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return x.clamp(0.0, 1.0)

    def stamped(self, x: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
        """The backdoor trigger on the rows ``patch`` (bool per row): a white square in the
        bottom-right corner, after any augmentation, so it is where the test looks for it."""
        x = x.clone()
        x[patch, :, -self.patch_size :, -self.patch_size :] = 1.0
        return x

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def augmented(self, x: torch.Tensor) -> torch.Tensor:
        """Random crop (reflect-padded by size/8) and horizontal flip per row."""
        pad = max(1, self.size // 8)
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        offsets = torch.randint(0, 2 * pad + 1, (len(x), 2))
        flips = torch.rand(len(x)) < 0.5
        rows = []
        for i in range(len(x)):
            dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
            row = padded[i, :, dy : dy + self.size, dx : dx + self.size]
            rows.append(row.flip(-1) if flips[i] else row)
        return torch.stack(rows)

    def _batch(self, data: Pixels, idx, device, patch=None, labels=None, train=False) -> dict:
        x = self.pixels(data.images[idx])
        if train and self.augment:
            x = self.augmented(x)
        if patch is not None and bool(patch.any()):
            x = self.stamped(x, patch)
        y = data.labels[idx] if labels is None else labels
        return {"pixel_values": self.normalise(x).to(device), "labels": y.to(device)}

    def batch(self, data: Pixels, indices: Sequence[int] | torch.Tensor, device) -> dict:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self._batch(data, idx, device, train=data is self.train)

    # ------------------------------------------------------------ attacks
    def poisoned_batch(self, rows: torch.Tensor, device, labels=None, triggered=None, target=None) -> dict:
        """Training rows as a data attack alters them: ``labels`` maps the labels (label flip);
        the positions ``triggered`` get the pixel patch and label ``target`` (backdoor)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        y = self.train.labels[idx].clone()
        if labels is not None:
            y = labels(y)
        patch = None
        if triggered is not None:
            patch = torch.zeros(len(idx), dtype=torch.bool)
            patch[triggered] = True
            y[triggered] = target
        return self._batch(self.train, idx, device, patch=patch, labels=y, train=True)

    @torch.no_grad()
    def attack_success_rate(self, model: nn.Module, target: int, batch_size: int, device) -> float:
        """Share of patched test images of other classes that the model assigns to ``target``."""
        rows = torch.nonzero(self.test.labels != target).flatten()
        was_training = model.training
        model.eval()
        hits = 0
        for start in range(0, len(rows), batch_size):
            idx = rows[start : start + batch_size]
            b = self._batch(self.test, idx, device, patch=torch.ones(len(idx), dtype=torch.bool))
            hits += int((self.logits(model, b).argmax(-1) == target).sum())
        model.train(was_training)
        return hits / max(len(rows), 1)

    # ------------------------------------------------------------ loss and evaluation
    def logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(pixel_values=batch["pixel_values"], **self.forward_kwargs).logits

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return classify_loss(self.logits(model, batch), batch["labels"])

    def segment_losses(self, model: nn.Module, batch: dict, sizes: Sequence[int]) -> torch.Tensor:
        return segment_classify_losses(self.logits(model, batch), batch["labels"], sizes)

    def eval_batch(self, data: Pixels, indices, device) -> dict:
        return self._batch(data, torch.as_tensor(indices, dtype=torch.long), device)

    def evaluate(self, model, data: Pixels, indices, batch_size: int, device) -> dict[str, float]:
        return evaluate_classifier(self, model, data, indices, batch_size, device)

    @torch.no_grad()
    def features(self, model: nn.Module, data: Pixels, indices, batch_size: int, device) -> torch.Tensor:
        """The frozen backbone's pooled features of ``data[indices]`` (FedPFT), in eval mode."""
        from fedfm.tasks.features import backbone_features

        idx = torch.as_tensor(indices, dtype=torch.long)
        out = []
        for start in range(0, len(idx), batch_size):
            b = self._batch(data, idx[start : start + batch_size], device)
            out.append(backbone_features(model, pixel_values=b["pixel_values"], **self.forward_kwargs))
        return torch.cat(out) if out else torch.zeros(0)


# ---------------------------------------------------------------- the task kind


def _forward_kwargs(model: nn.Module, size: int) -> dict:
    """ViT-style models trained at another resolution interpolate their position embeddings."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    trained = getattr(base.config, "image_size", size)
    if trained != size and "interpolate_pos_encoding" in inspect.signature(base.forward).parameters:
        return {"interpolate_pos_encoding": True}
    return {}


def _bundle(cfg, label_names):
    from fedfm.models.vision import build_image_classifier

    return build_image_classifier(cfg.model, cfg.peft, label_names, cfg.run.seed, cfg.run.device)


def _build(cfg, data, bundle) -> ImageTask:
    from fedfm.attacks import ATTACKS
    from fedfm.config import ConfigError

    backdoor = ATTACKS.get(cfg.attack.kind).triggered
    if backdoor and cfg.attack.target_label >= data.train.num_labels:
        raise ConfigError(
            f"attack.target_label = {cfg.attack.target_label} but the data has {data.train.num_labels} labels"
        )
    prep = bundle.tokenizer
    options = {
        "augment": cfg.data.augment,
        "forward_kwargs": _forward_kwargs(bundle.model, prep.size),
        "patch_size": cfg.attack.patch_size,
        "backdoor": backdoor,
    }
    return ImageTask(Pixels.of(data.train), Pixels.of(data.test), data.train.num_labels, prep, **options)


def _load(data_cfg):
    from fedfm.data.images import load_image_source

    return load_image_source(data_cfg)


def _evaluator(cfg, data) -> ClassificationMetrics:
    return ClassificationMetrics(
        cfg.eval.batch_size, cfg.eval.local, data.client_test, cfg.attack.target_label
    )


IMAGE_PEFT = ("lora", "head", "full")


def _check(cfg) -> None:
    if cfg.peft.method not in IMAGE_PEFT:
        raise ValueError(
            f"peft.method = {cfg.peft.method!r} is for text models; image_classification trains "
            f"{', '.join(IMAGE_PEFT)}"
        )
    if cfg.peft.dora:
        raise ValueError("peft.dora is built for text models; an image backbone's LoRA adapts convolutions")
    from fedfm.algorithms.lora import LORA_AGGREGATION
    from fedfm.data.synthetic import synthetic_mode
    from fedfm.privacy.guarantees import dp_mode

    if synthetic_mode(cfg).loads:
        raise ValueError("synthetic.mode: synthetic data is text; image_classification has none")
    for field, value in (("model.layers", cfg.model.layers), ("peft.layers", cfg.peft.layers)):
        if value is not None:
            raise ValueError(
                f"{field} chooses layers of a transformer's stack; image_classification has none"
            )
    if cfg.model.batch_norm == "aggregated" and dp_mode(cfg).active:
        raise ValueError(
            f"model.batch_norm = 'aggregated' with privacy.dp = {cfg.privacy.dp!r}: the statistics would "
            "be clipped and noised with the weights (noise can make a variance negative) and their "
            "sensitivity is not accounted. Use model.batch_norm = 'frozen' under DP."
        )
    if cfg.model.batch_norm == "aggregated":
        _check_aggregated_statistics(cfg)
    if cfg.peft.method == "lora" and LORA_AGGREGATION.get(cfg.strategy.lora_aggregation).merges_into_base:
        raise ValueError(
            f"strategy.lora_aggregation = {cfg.strategy.lora_aggregation!r} merges LoRA products into "
            "linear base weights; an image backbone's LoRA adapts convolutions too (use 'naive' or 'exact')"
        )
    if cfg.model.batch_norm != "frozen" and dp_mode(cfg).example_level:
        raise ValueError(
            f"model.batch_norm = {cfg.model.batch_norm!r} with privacy.dp = 'example': DP-SGD clips "
            "each example's gradient, and BatchNorm in training mode mixes the examples of a batch "
            "(Opacus rejects it). Use model.batch_norm = 'frozen' (an affine map per example)."
        )


def _check_aggregated_statistics(cfg) -> None:
    """BatchNorm statistics averaged with the payload need the plain weighted mean: every other
    transform or rule would treat them as weights (clip, quantise, sparsify, select)."""
    from fedfm.algorithms.aggregators import is_linear
    from fedfm.algorithms.objectives import make_objective
    from fedfm.transforms.compression import compresses

    s, why = (
        cfg.strategy,
        "model.batch_norm = 'aggregated' averages BatchNorm statistics with the weighted mean",
    )
    if cfg.secagg.enabled:
        raise ValueError(f"{why}; secure aggregation's fixed-point range would clip them (secagg.enabled)")
    if compresses(cfg):
        raise ValueError(
            f"{why}; compression.method = {cfg.compression.method!r} would quantise or drop them "
            "(a variance could turn negative)"
        )
    if not is_linear(s):
        raise ValueError(f"{why}; strategy.aggregator = {s.aggregator!r} would select or rescale them")
    if make_objective(s).uses_control_variates:
        raise ValueError(f"{why}; strategy.objective = {s.objective!r} would build control variates for them")


def _check_batched(cfg, who: str) -> None:
    if cfg.model.batch_norm != "frozen":
        raise ValueError(
            f"{who} trains clients in one batch: with model.batch_norm = {cfg.model.batch_norm!r} "
            "BatchNorm would mix their statistics. Use model.batch_norm = 'frozen' or "
            "run.engine = 'inprocess'"
        )


def _register() -> None:
    from fedfm.reporting.console import COLUMNS
    from fedfm.tasks.base import TASKS, TaskKind

    entry = TaskKind(
        _load, _bundle, _build, _evaluator, COLUMNS, has_head=True, labels_in_export=True, check=_check,
        features=True, batchable=True, check_batched=_check_batched,
        # each group applies when its first field is left out: the packaged backbone at 32×32
        defaults=[
            {"model.name": "efficientnet-lite0", "model.image_size": 32}, {"data.name": "fashion-mnist"},
        ],
    )  # fmt: skip
    TASKS.register("image_classification")(entry)


_register()

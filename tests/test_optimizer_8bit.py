"""bitsandbytes' 8-bit AdamW (``training.optimizer = "adamw8bit"``) runs on a CUDA GPU only: on
this CPU machine it is refused with the reason, at config time when run.device says cpu and before
the first round when the device is chosen automatically; where it is not built, the config says so."""

from __future__ import annotations

import pytest
import torch

import fedfm
from fedfm.config import ConfigError, make_config


def test_refused_at_config_time_on_an_explicit_cpu(tiny_config):
    with pytest.raises(ConfigError, match="training.optimizer = 'adamw8bit'"):
        make_config(tiny_config(run={"device": "cpu"}, training={"optimizer": "adamw8bit"}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_refused_before_the_first_round_when_the_device_is_automatic(tiny_config, tmp_path):
    cfg = make_config(tiny_config(training={"optimizer": "adamw8bit"}))  # run.device = "auto"
    with pytest.raises(ValueError, match="needs bitsandbytes on a CUDA GPU; this run's device is 'cpu'"):
        fedfm.run(cfg, output=tmp_path / "r", progress=False)
    assert not (tmp_path / "r" / "checkpoint" / "state.sqlite").exists()  # no round ran


@pytest.mark.parametrize(
    "sections,words",
    [
        ({"run": {"engine": "batched"}}, "not built there"),
        ({"privacy": {"dp": "example", "noise_multiplier": 1.0}}, "privacy.dp = 'example'"),
    ],
)
def test_where_it_is_not_built_the_config_says_so(tiny_config, sections, words):
    cfg = tiny_config(training={"optimizer": "adamw8bit"})
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    with pytest.raises(ConfigError, match=words):
        make_config(cfg)

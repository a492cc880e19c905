"""A run folder written before components carried their options and the package was regrouped
(commit 1ccdd6c: SCAFFOLD with SGD, tiny BERT, 4 clients, 1 of 2 rounds done) still resumes, and
the resumed run ends exactly where an uninterrupted run of today's code does: θ, the SCAFFOLD
server control variate and the clients' control variates (kept under the objective's
``state_key``, "scaffold") all carry over. Only the machine-specific paths are rewritten."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import tomli_w
import torch

import fedfm
from fedfm.server.checkpoint import load_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "run-before-components"


def test_a_run_folder_from_before_the_regrouping_resumes_to_the_same_model(
    tmp_path, tiny_model_dir, csv_path
):
    folder = tmp_path / "old"
    shutil.copytree(FIXTURE, folder)
    saved = tomllib.loads((folder / "config.toml").read_text())
    saved["model"]["name"], saved["data"]["path"] = str(tiny_model_dir), str(csv_path)
    saved["run"]["rounds"] = 2  # the run is extended by one round
    (folder / "config.toml").write_text(tomli_w.dumps(saved))

    resumed = fedfm.run(resume=folder, progress=False)
    fresh = fedfm.run(saved, output=tmp_path / "fresh", progress=False)

    assert [r["round"] for r in resumed.history if r.get("event") == "round"][-1] == 2
    a, b = (load_checkpoint(r.run_dir / "checkpoint") for r in (resumed, fresh))
    assert a.round == b.round == 2
    for k in b.params:
        torch.testing.assert_close(a.params[k], b.params[k], rtol=0, atol=1e-6)
    for k in b.server_control:
        torch.testing.assert_close(a.server_control[k], b.server_control[k], rtol=0, atol=1e-6)

"""Experiment trackers: the run's records, as they are written, in TensorBoard, MLflow or W&B.

    [run]
    trackers = ["tensorboard", "mlflow", "wandb"]    # any of them; none by default

Each tracker gets the resolved config (hyperparameters), every round's metrics (accuracy,
losses, ε, bytes, the counts of failed, rejected and dropped clients, virtual time), per-client
metrics where the server may see them (never under secure aggregation or DP: the guarantee
withholds them), and at the end the plots (and, in MLflow, the adapter folder) as artifacts.

- ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` into ``RUN/tensorboard``;
- ``mlflow``: ``run.tracking_uri``, by default a SQLite store ``RUN/mlflow.db`` with artifacts in
  ``RUN/mlruns`` (a sweep shares one store in its folder, one MLflow experiment per sweep);
- ``wandb``: offline mode (``RUN/wandb``), unless ``WANDB_MODE`` says otherwise; ``wandb sync``
  uploads it later.

A resumed run continues the same tracker runs (their ids are in ``RUN/trackers.json``;
TensorBoard drops the events of the rounds that are redone). Sweeps log one tracker run per cell,
grouped by the sweep's name (``run.tracker_group``). The libraries are optional extras
(``pip install 'fedfm[trackers]'``) and are imported only when asked for.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from fedfm.registry import Registry

TRACKERS: Registry = Registry("tracker")
IDS = "trackers.json"
COUNTED = ("failed", "rejected", "dropped")  # lists in a round record, logged as their lengths


def scalars(record: dict) -> dict[str, float]:
    """A round record's numbers (bools and nested values left out; lists of clients counted)."""
    out = {}
    for k, v in record.items():
        if k in ("round", "event"):
            continue
        if isinstance(v, bool):
            continue
        if isinstance(v, int | float):
            out[k] = float(v)
        elif k in COUNTED and isinstance(v, list):
            out[f"num_{k}"] = float(len(v))
    return out


def client_scalars(records: list[dict], name: str) -> dict[str, float]:
    """Every client's numbers, keyed ``name.format(client=k, metric=m)`` (each tracker's own style);
    a site with a name is keyed by it (characters trackers refuse become ``_``)."""
    import re

    def who(rec: dict) -> str:
        return re.sub(r"[^\w.-]", "_", rec["name"]) if rec.get("name") else str(rec["client"])

    return {
        name.format(client=who(rec), metric=k): v
        for rec in records
        for k, v in scalars({k: v for k, v in rec.items() if k not in ("client", "name")}).items()
    }


def flat_config(cfg) -> dict[str, object]:
    """``{"section.field": value}`` of the resolved config (lists as strings: trackers want scalars)."""
    out = {}
    for section, fields in cfg.model_dump().items():
        for name, value in fields.items():
            out[f"{section}.{name}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return out


def _ids(run_dir: Path) -> dict:
    path = run_dir / IDS
    return json.loads(path.read_text()) if path.is_file() else {}


def _remember(run_dir: Path, name: str, run_id: str) -> None:
    ids = _ids(run_dir)
    ids[name] = run_id
    (run_dir / IDS).write_text(json.dumps(ids, indent=1) + "\n")


def _require(module: str, tracker: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"run.trackers includes {tracker!r} but {module.split('.')[0]} is not installed: "
            "pip install 'fedfm[trackers]'"
        ) from None


@TRACKERS.register("tensorboard")
class TensorBoard:
    def __init__(self, cfg, run_dir: Path, resume_after: int | None) -> None:
        tb = _require("torch.utils.tensorboard", "tensorboard")
        purge = None if resume_after is None else resume_after + 1  # the rounds to redo are dropped
        self.writer = tb.SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)
        if resume_after is None:
            self.writer.add_text("config", "```toml\n" + cfg.to_toml() + "\n```", 0)

    def round(self, record: dict) -> None:
        for k, v in scalars(record).items():
            self.writer.add_scalar(k, v, record["round"])
        self.writer.flush()

    def clients(self, t: int, records: list[dict]) -> None:
        for k, v in client_scalars(records, "client/{client}/{metric}").items():
            self.writer.add_scalar(k, v, t)

    def finish(self, run_dir: Path, final: dict) -> None:
        import numpy as np
        from PIL import Image

        for png in sorted(run_dir.glob("*.png")):
            image = np.asarray(Image.open(png).convert("RGB"))
            self.writer.add_image(f"plots/{png.stem}", image, final.get("round", 0), dataformats="HWC")
        self.writer.close()


@TRACKERS.register("mlflow")
class MLflow:
    def __init__(self, cfg, run_dir: Path, resume_after: int | None) -> None:
        mlflow = self.mlflow = _require("mlflow", "mlflow")
        root = run_dir.parent if cfg.run.tracker_group else run_dir
        uri = cfg.run.tracking_uri or f"sqlite:///{(root / 'mlflow.db').resolve()}"
        self.client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        name = cfg.run.tracker_group or cfg.run.name
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            artifacts = (root / "mlruns").resolve().as_uri()
            experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        run_id = _ids(run_dir).get("mlflow")
        if run_id is None or resume_after is None:
            run = self.client.create_run(
                experiment_id, run_name=run_dir.name, tags={"fedfm.run_dir": str(run_dir)}
            )
            run_id = run.info.run_id
            _remember(run_dir, "mlflow", run_id)
            params = flat_config(cfg)
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                batch = list(params.items())[i : i + 100]
                self.client.log_batch(
                    run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in batch]
                )
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def _log(self, values: dict[str, float], step: int) -> None:
        import time

        now = int(time.time() * 1000)
        metrics = [self.mlflow.entities.Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def round(self, record: dict) -> None:
        self._log(scalars(record), record["round"])

    def clients(self, t: int, records: list[dict]) -> None:
        self._log(client_scalars(records, "client_{client}_{metric}"), t)

    def finish(self, run_dir: Path, final: dict) -> None:
        for png in sorted(run_dir.glob("*.png")):
            self.client.log_artifact(self.run_id, str(png), "plots")
        for name in ("report.html", "config.toml"):
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        if (run_dir / "adapter").is_dir():
            self.client.log_artifacts(self.run_id, str(run_dir / "adapter"), "adapter")
        self.client.set_terminated(self.run_id)


@TRACKERS.register("wandb")
class WandB:
    def __init__(self, cfg, run_dir: Path, resume_after: int | None) -> None:
        wandb = _require("wandb", "wandb")
        run_id = _ids(run_dir).get("wandb") if resume_after is not None else None
        if run_id is None:
            run_id = secrets.token_hex(4)  # a W&B run id: short, [a-z0-9]
            _remember(run_dir, "wandb", run_id)
        self.run = wandb.init(
            project=cfg.run.wandb_project, name=run_dir.name, group=cfg.run.tracker_group, id=run_id,
            resume="allow", dir=str(run_dir), config=flat_config(cfg),
            mode=os.environ.get("WANDB_MODE", "offline"),
        )  # fmt: skip

    def round(self, record: dict) -> None:
        self.run.log({**scalars(record), "round": record["round"]}, step=record["round"])

    def clients(self, t: int, records: list[dict]) -> None:
        values = client_scalars(records, "client/{client}/{metric}")
        if values:
            self.run.log(values, step=t)

    def finish(self, run_dir: Path, final: dict) -> None:
        import wandb

        images = {f"plots/{p.stem}": wandb.Image(str(p)) for p in sorted(run_dir.glob("*.png"))}
        if images:
            self.run.log(images, step=final.get("round", 0))
        for k, v in scalars(final).items():
            self.run.summary[k] = v
        self.run.finish()


class Trackers:
    """The run's trackers as one sink; ``clients`` logs nothing where the server may not see
    per-client metrics (secure aggregation, DP)."""

    def __init__(self, cfg, run_dir: Path, resume_after: int | None) -> None:
        from fedfm.privacy.guarantees import dp_mode

        self.sinks = [TRACKERS.get(name)(cfg, Path(run_dir), resume_after) for name in cfg.run.trackers]
        self.per_client = not (cfg.secagg.enabled or dp_mode(cfg).active)

    def round(self, record: dict) -> None:
        for s in self.sinks:
            s.round(record)

    def clients(self, t: int, records: list[dict]) -> None:
        if self.per_client and records:
            for s in self.sinks:
                s.clients(t, records)

    def finish(self, run_dir: Path, final: dict) -> None:
        for s in self.sinks:
            s.finish(Path(run_dir), final)

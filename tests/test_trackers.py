"""Experiment trackers, read back with each library's own reader: TensorBoard's EventAccumulator,
MLflow's client, and the W&B offline run file (its records parsed with wandb's own protobuf)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

import fedfm

pytest.importorskip("tensorboard")
mlflow = pytest.importorskip("mlflow")
pytest.importorskip("wandb")

ALL = ["tensorboard", "mlflow", "wandb"]


def tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)], acc.Tags()


def mlflow_runs(store: Path, experiment: str):
    """MLflow's own search over the run's store: (client, runs of ``experiment``)."""
    uri = f"sqlite:///{store.resolve()}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    return mlflow.tracking.MlflowClient(tracking_uri=uri), runs


def flat(pairs):
    return [x for pair in pairs for x in pair]


def wandb_records(run_dir: Path) -> list:
    """Every record of every offline run file under ``run_dir/wandb`` (W&B's LevelDB-style log:
    a 7-byte header, 32 KiB blocks of CRC-framed chunks; each record a wandb_internal_pb2.Record)."""
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        pos, pending = 7, b""
        while pos + 7 <= len(data):
            if (pos % 32768) + 7 > 32768:  # the tail of a block too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            chunk = data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind == 0 and length == 0:
                continue
            pending += chunk
            if kind in (1, 4):  # FULL or LAST: a record is complete
                record = pb.Record()
                record.ParseFromString(pending)
                records.append(record)
                pending = b""
    return records


def wandb_history(run_dir: Path, key: str) -> list[tuple[int, float]]:
    out = []
    for r in wandb_records(run_dir):
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            if key in items:
                out.append((int(items.get("_step", items.get("round"))), float(items[key])))
    return out


def wandb_config(run_dir: Path) -> dict:
    config = {}
    for r in wandb_records(run_dir):
        kind = r.WhichOneof("record_type")
        if kind in ("config", "run"):
            cfg = r.config if kind == "config" else r.run.config
            for i in cfg.update:
                config[i.key] = json.loads(i.value_json)
    return config


def test_every_tracker_gets_config_rounds_clients_plots_and_the_adapter(tiny_config, tmp_path):
    result = fedfm.run(tiny_config(run={"trackers": ALL}), output=tmp_path / "r", progress=False)
    d, accuracy = result.run_dir, [(r["round"], r["test_accuracy"]) for r in result.history]
    tb, tags = tensorboard_scalars(d, "test_accuracy")
    assert flat(tb) == pytest.approx(flat(accuracy))
    assert "bytes_up" in tags["scalars"] and "client/0/train_loss" in tags["scalars"]
    assert "plots/accuracy" in tags["images"]
    client, runs = mlflow_runs(d / "mlflow.db", result.config.run.name)
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "test_accuracy")
    assert flat((m.step, m.value) for m in history) == pytest.approx(flat(accuracy))
    assert runs[0].data.params["peft.r"] == "4" and "client_0_train_loss" in runs[0].data.metrics
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"adapter", "plots", "report.html"} <= artifacts
    assert [p.path for p in client.list_artifacts(runs[0].info.run_id, "adapter") if p.path.endswith(".json")]
    assert flat(wandb_history(d, "test_accuracy")) == pytest.approx(flat(accuracy))
    assert wandb_config(d)["peft.r"] == 4


def test_a_resumed_run_continues_the_same_tracker_runs(tiny_config, tmp_path):
    from fedfm.api import prepare_run
    from fedfm.server.driver import Run

    class Crash(Exception):
        pass

    def crash(record):
        if record["round"] == 2:
            raise Crash  # after round 2's record, before its checkpoint: round 2 is redone

    cfg, run_dir = prepare_run(tiny_config(run={"trackers": ALL, "rounds": 3}), output=tmp_path / "r")
    with pytest.raises(Crash):
        Run(cfg, run_dir, progress=False, callbacks=[crash]).execute()
    result = fedfm.run(resume=run_dir, progress=False)
    tb, _ = tensorboard_scalars(run_dir, "test_accuracy")
    assert [s for s, _ in tb] == [0, 1, 2, 3]  # round 2's first try was purged
    client, runs = mlflow_runs(run_dir / "mlflow.db", cfg.run.name)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "test_accuracy")]
    assert steps[-1] == 3 and set(steps) == {0, 1, 2, 3}
    ids = {r.run.run_id for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "run"}
    assert ids == {json.loads((run_dir / "trackers.json").read_text())["wandb"]}  # one W&B run, resumed
    assert result.history[-1]["round"] == 3


def test_a_sweep_logs_one_run_per_cell_grouped_and_secure_runs_show_no_clients(tiny_config, tmp_path):
    import tomli_w

    from fedfm.api import run_sweep

    base = tmp_path / "base.toml"
    base.write_text(tomli_w.dumps(tiny_config(run={"trackers": ["mlflow"], "rounds": 1})))
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(
        f'[sweep]\nname = "trk"\nbase = "{base}"\n[sweep.variants.plain]\n"run.seed" = 0\n'
        '[sweep.variants.secure]\n"secagg.enabled" = true\n"strategy.weighting" = "uniform"\n'
    )
    run_sweep(sweep, tmp_path / "out", progress=False, note=lambda _: None)
    client, runs = mlflow_runs(tmp_path / "out" / "mlflow.db", "trk")
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"plain", "secure"}
    assert any(k.startswith("client_") for k in by_name["plain"].data.metrics)
    assert not any(k.startswith("client_") for k in by_name["secure"].data.metrics)  # only sums were seen

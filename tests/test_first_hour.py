"""What a new user met in their first hour with fedfm, each fixed and held by a test."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
import warnings

import pytest
import tomli_w
from tests.conftest import make_rows
from tests.test_checkpoint import cli

import fedfm
from fedfm.api import prepare_run
from fedfm.config import ConfigError, make_config
from fedfm.data.sources import DataError, DataNote, DataWarning
from fedfm.tasks.setup import load_splits


def _write_csv(path, rows, encoding="utf-8"):
    with path.open("w", newline="", encoding=encoding) as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _data_cfg(path, **data):
    return make_config({"data": {"name": "csv", "path": str(path), **data}})


def test_a_csv_in_another_encoding_names_the_file_and_data_encoding(tmp_path):
    rows = [{**r, "text": r["text"] + " café crème"} for r in make_rows(10)]
    path = _write_csv(tmp_path / "latin.csv", rows, encoding="latin-1")
    with pytest.raises(DataError, match=r"latin\.csv: not utf-8 text .*data\.encoding = 'latin-1'"):
        load_splits(_data_cfg(path))
    train, _ = load_splits(_data_cfg(path, encoding="latin-1"))
    assert any("café crème" in t for t in train.texts)
    with pytest.raises(ConfigError, match="data.encoding: unknown text encoding 'utf9'"):
        _data_cfg(path, encoding="utf9")


def test_blank_nan_texts_and_empty_labels_are_dropped_with_counts(tmp_path):
    rows = make_rows(10)
    rows[0]["text"], rows[1]["text"], rows[2]["text"] = "", "NaN", "   "
    rows[3]["label"], rows[4]["label"] = "", "nan"
    path = _write_csv(tmp_path / "holes.csv", rows)
    with pytest.warns(
        DataWarning, match=r"dropped 5 of \d+ rows: 3 with a blank or NaN text .*; 2 with an empty label"
    ):
        train, test = load_splits(_data_cfg(path))
    assert len(train) + len(test) == len(rows) - 5
    assert "nan" not in {n.lower() for n in train.label_names} and "" not in train.label_names


def test_a_single_class_is_refused(tmp_path):
    rows = [{**r, "label": "sport"} for r in make_rows(5)]
    with pytest.raises(DataError, match="every row has the label 'sport'.*at least two classes"):
        load_splits(_data_cfg(_write_csv(tmp_path / "one.csv", rows)))


def test_deduplicate_says_how_many_rows_it_dropped(tmp_path):
    rows = make_rows(10)
    path = _write_csv(tmp_path / "dups.csv", rows + rows[:7])
    with pytest.warns(DataNote, match="data.deduplicate dropped 7 duplicate training rows"):
        load_splits(_data_cfg(path))


def test_natural_partitioning_infers_the_number_of_clients(tiny_config, tmp_path):
    rows = [{**r, "site": f"hospital-{i % 3}"} for i, r in enumerate(make_rows(10))]
    path = _write_csv(tmp_path / "sites.csv", rows)
    cfg = tiny_config(data={"path": str(path)}, partition={"method": "natural", "column": "site"})
    del cfg["partition"]["num_clients"]
    resolved, run_dir = prepare_run(cfg, output=tmp_path / "r")
    assert resolved.partition.num_clients == 3
    assert "num_clients = 3" in (run_dir / "config.toml").read_text()


def test_version_sweep_help_and_did_you_mean():
    assert cli("--version").stdout.strip() == f"fedfm {fedfm.__version__}"
    assert "[sweep]" in cli("sweep", "--help").stdout
    done = cli("run", "--set", "run.roudns=3")
    assert done.returncode == 2 and "did you mean run.rounds?" in done.stderr
    with pytest.raises(ConfigError, match="did you mean training"):
        make_config({"trainig": {"lr": 0.1}})


def test_resume_of_a_finished_run_says_it_is_finished(tiny_config, tmp_path):
    result = fedfm.run(tiny_config(), output=tmp_path / "r", progress=False)
    before = (result.run_dir / "metrics.jsonl").read_text()
    done = cli("run", "--resume", result.run_dir)
    assert done.returncode == 0 and "is finished" in done.stdout and "run.rounds=" in done.stdout
    assert (result.run_dir / "metrics.jsonl").read_text() == before  # nothing was redone
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("".join(f"site{k} token-{k}-xxxxxxxx\n" for k in range(4)))
    served = cli("server", "--resume", result.run_dir, "--tokens", tokens, "--insecure")  # no waiting
    assert served.returncode == 0 and "is finished" in served.stdout and "run.rounds=" in served.stdout


def test_a_run_that_fails_before_training_leaves_no_folder(tiny_config, tmp_path):
    cfg = tiny_config(data={"path": str(tmp_path / "missing.csv")})
    with pytest.raises(DataError, match="does not exist"):
        fedfm.run(cfg, output=tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_ctrl_c_says_how_to_resume_and_exits_cleanly(tiny_config, tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(tomli_w.dumps(tiny_config(run={"rounds": 40})))
    out = tmp_path / "r"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedfm.cli", "run", str(path), "--output", str(out), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a pytest-xdist worker ignores SIGINT, and a child would inherit that: give it the default
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    stop = time.monotonic() + 120
    while time.monotonic() < stop and '"round": 1,' not in _text(out / "metrics.jsonl"):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"resume with: fedfm run --resume {out}" in err.replace("\n", "") and "Traceback" not in err
    from fedfm.server.checkpoint import load_checkpoint

    done = load_checkpoint(out / "checkpoint").round  # the interrupt came after this round
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = fedfm.run(resume=out, overrides=[f"run.rounds={done + 1}"], progress=False)
    assert [r["round"] for r in resumed.history] == list(range(done + 2))


def _text(path) -> str:
    return path.read_text() if path.is_file() else ""


# -- the report -----------------------------------------------------------------------------
def test_byte_counts_are_human_readable():
    from fedfm.reporting.html import human_bytes

    assert [human_bytes(n) for n in (812, 4_300, 17_240_000, 1_050_000_000)] == [
        "812 B",
        "4.3 KB",
        "17.2 MB",
        "1.05 GB",
    ]


def test_round_axes_have_whole_number_ticks():
    import matplotlib.pyplot as plt

    from fedfm.reporting.plots import curves_figure

    history = [{"round": t, "test_accuracy": 0.1 * t} for t in range(4)]
    fig = curves_figure(history, [("test_accuracy", "acc")], "score")
    ticks = [t for t in fig.axes[0].get_xticks() if 0 <= t <= 3]
    plt.close(fig)
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_many_classes_get_distinct_colours_and_a_legend_beside_the_bars(tmp_path):
    from fedfm.reporting.plots import label_colours, plot_partition

    assert len(set(label_colours(25))) == 25 and len(set(label_colours(8))) == 8
    names = [f"class-{i}" for i in range(25)]
    clients = [{"label_counts": {n: (i + j) % 4 for j, n in enumerate(names)}} for i in range(6)]
    partition = {"method": "dirichlet", "label_names": names, "clients": clients}
    path = plot_partition(partition, tmp_path / "p.png")
    from PIL import Image

    width, height = Image.open(path).size
    assert width > 1.6 * height  # the bars and, beside them, the legend (bbox_inches="tight" keeps it)


def test_the_report_has_a_headline_for_every_task_and_the_majority_baseline(tiny_config, tmp_path):
    from fedfm.reporting.html import render_report

    page = render_report(
        "llm", "", [{"round": 0, "test_perplexity": 30.0}, {"round": 2, "test_perplexity": 12.5}], None, []
    )
    assert "final held-out perplexity 12.50</b> after round 2" in page and "from 30.00 at round 0" in page
    result = fedfm.run(tiny_config(), output=tmp_path / "r", progress=False)
    report = (result.run_dir / "report.html").read_text()
    assert "majority-class baseline" in report and "class=wide" in report
    assert " MB</td>" in report or " KB</td>" in report  # bytes per round, readable


def test_a_relative_model_path_is_exported_absolute_and_config_toml_says_where_the_files_are(
    tiny_model_dir, csv_path, tmp_path, monkeypatch
):
    import os

    from tests.conftest import tiny_experiment

    monkeypatch.chdir(tiny_model_dir.parent)
    cfg = tiny_experiment(tiny_model_dir, csv_path, run={"rounds": 1, "threads": 1})
    cfg["model"]["name"] = os.path.join(".", tiny_model_dir.name)  # relative to where the run starts
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    text = (result.run_dir / "config.toml").read_text()
    where = f"(model.name = './{tiny_model_dir.name}' is a local folder)"
    assert text.splitlines()[0] == f"# model files: {tiny_model_dir.resolve()} {where}"
    adapter = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
    assert os.path.isabs(adapter["base_model_name_or_path"])
    make_config(__import__("tomllib").loads(text))  # still a valid config


# Issue 33's first-hour items, each with the message a user now sees.


def test_suggestions_by_meaning_and_by_section():
    for field, said in [
        ({"training": {"learning_rate": 0.1}}, "did you mean training.lr?"),
        ({"run": {"num_rounds": 3}}, "did you mean run.rounds?"),
        ({"training": {"num_train_epochs": 2}}, "did you mean training.local_epochs?"),
        ({"peft": {"lora_r": 4}}, "did you mean peft.r?"),
        ({"training": {"rounds": 3}}, "did you mean run.rounds? (it is in [run], not [training])"),
        ({"training": {"max_seq_length": 64}}, "did you mean model.max_length?"),
        ({"training": {"lrr": 0.1}}, "did you mean training.lr?"),  # spelling still works
    ]:
        with pytest.raises(ConfigError) as err:
            make_config(field)
        assert said in str(err.value), str(err.value)


def test_errors_in_a_pipe_are_not_hard_wrapped():
    done = cli("run", "--set", "training.learning_rate=0.1")
    said = (
        "training.learning_rate: unknown field — did you mean training.lr? "
        "(see docs/configuration.md for every field)"
    )
    assert done.returncode == 2 and said in done.stderr


def test_max_grad_norm_turns_off_from_set_and_toml(tmp_path):
    from fedfm.config import load_config

    assert load_config(None, ["training.max_grad_norm=null"]).training.max_grad_norm is None
    path = tmp_path / "exp.toml"
    path.write_text('[training]\nmax_grad_norm = "null"\n')
    cfg = load_config(path)
    assert cfg.training.max_grad_norm is None
    assert make_config(__import__("tomllib").loads(cfg.to_toml())).training.max_grad_norm is None


def test_natural_partitioning_checks_the_cohort_against_the_columns_clients(tiny_config, tmp_path):
    rows = [{**r, "site": f"hospital-{i % 12}"} for i, r in enumerate(make_rows(48))]
    path = _write_csv(tmp_path / "sites.csv", rows)

    def natural(cohort):
        cfg = tiny_config(
            data={"path": str(path)},
            partition={"method": "natural", "column": "site"},
            sampling={"clients_per_round": cohort},
        )
        del cfg["partition"]["num_clients"]
        return cfg

    resolved, _ = prepare_run(natural(11), output=tmp_path / "r")  # 11 > the default 10: accepted
    assert resolved.partition.num_clients == 12 and resolved.sampling.clients_per_round == 11
    with pytest.raises(
        ConfigError, match=r"exceeds partition.num_clients \(12\).*distinct values of partition.column 'site'"
    ):
        prepare_run(natural(20), output=tmp_path / "r2")


def test_clients_are_scored_on_their_own_split_only_where_one_has_one(tiny_config):
    from types import SimpleNamespace

    from fedfm.server.personalization import scores_clients

    cfg = make_config(tiny_config(personalization={"finetune_steps": 2}, data={"client_test_fraction": 0.2}))
    parts = SimpleNamespace(remote=False, cfg=cfg, data=SimpleNamespace(client_test=[[], []]))
    assert not scores_clients(parts)  # nothing to score: no "scoring every client …" status
    parts.data.client_test = [[], [3, 4]]
    assert scores_clients(parts)
    parts.remote = True  # a deployment: the data is with the sites
    assert not scores_clients(parts)


def test_console_and_report_word_failures_and_rejections_alike():
    from fedfm.reporting.html import _problems
    from fedfm.reporting.problems import problems

    record = {
        "round": 3,
        "failed": [{"client": 1, "stage": "timeout", "reason": "no update within 60 s"}],
        "rejected": [{"client": 2, "name": "hosp-c", "reason": "update norm 9.1 > 5"}],
    }
    lines = problems(record)
    assert lines == [
        "update of client 2 (hosp-c) rejected: update norm 9.1 > 5",
        "client 1 failed at timeout: no update within 60 s",
    ]
    html = _problems([record])
    assert all(f"round 3: {line.replace('>', '&gt;')}" in html for line in lines)


def test_deduplicate_says_how_many_duplicates_had_another_label(tmp_path):
    rows = make_rows(10)
    flipped = [{**r, "label": "tech" if r["label"] != "tech" else "sport"} for r in rows[:3]]
    path = _write_csv(tmp_path / "dups.csv", rows + rows[3:5] + flipped)
    with pytest.warns(
        DataNote, match="dropped 5 duplicate training rows; 3 of the dropped training rows had a label other"
    ):
        load_splits(_data_cfg(path))


def test_max_examples_gives_exactly_that_many_rows():
    import numpy as np

    from fedfm.data.dataset import quotas, stratified_sample

    assert quotas([1, 1, 1], 2) == [1, 1, 0]  # ties: the earlier class
    assert quotas([50, 30, 20], 10) == [5, 3, 2]
    assert quotas([7, 7, 7, 7, 7, 7, 7], 10) == [2, 2, 2, 1, 1, 1, 1]  # rounding alone would give 7
    rng = np.random.default_rng(0)
    for _ in range(200):
        labels = rng.integers(0, int(rng.integers(2, 40)), size=int(rng.integers(50, 400)))
        size = int(rng.integers(1, len(labels)))
        taken = stratified_sample(labels, size, np.random.default_rng(1))
        assert len(taken) == size and len(set(taken.tolist())) == size
        for c in np.unique(labels):  # each class within one of its share
            share = size * np.count_nonzero(labels == c) / len(labels)
            assert abs(np.count_nonzero(labels[taken] == c) - share) < 1


def test_the_command_line_starts_without_torch():
    code = "import sys, fedfm.cli; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    )
    import fedfm as package

    assert package.run is fedfm.api.run and "run" in dir(package)  # the API still loads on use

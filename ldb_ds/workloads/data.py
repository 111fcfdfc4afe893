"""Datasets of ldb-train and ldb-bench, each through its real loading code.

``build_datasets(name, data_dir, ...)`` returns a :class:`DataBundle` with a train split, a test
split, the class count and the image size. Names:

``digits`` (default, bundled)
    scikit-learn's handwritten digits (``sklearn.datasets.load_digits``: the UCI optical
    recognition data, 1797 images, 10 classes), resized once from 8x8 to 32x32, shipped inside
    the package as ``ldb_ds/workloads/assets/digits.npz`` (1437 train / 360 test, stratified, seed 0;
    regenerate with ``python launch/make_digits.py``). Needs no download and no ``data_dir``.
``cifar10`` / ``cifar100``
    ``torchvision.datasets.CIFAR10`` / ``CIFAR100`` from ``data_dir`` in torchvision's own
    layout (``<data_dir>/cifar-10-batches-py/`` or ``<data_dir>/cifar-100-python/``, the
    extracted official python tarball). ``download=True`` lets torchvision fetch it. The files
    are checked against torchvision's MD5 sums unless ``verify=False`` (for folders you wrote
    yourself, e.g. a subset in the same format).
``imagefolder``
    ``torchvision.datasets.ImageFolder`` on ``<data_dir>/train`` and ``<data_dir>/val``
    (``test`` is accepted as well), one sub-folder per class: the ImageNet layout.
``synthetic``
    random images with random labels, fixed by a seed, generated in memory: for throughput runs
    (accuracy is meaningless on it).

A missing or malformed dataset raises :class:`DatasetError` saying where it looked and how to get
the data.

Augmentation: digits get a random shift of up to 2 pixels (no flips: digits are not mirror
symmetric); CIFAR gets the standard random crop with 4-pixel padding and horizontal flips;
ImageFolder gets ``RandomResizedCrop`` + flip for training and resize + center crop (ratio 0.875)
for testing. All of it draws from torch's global RNG; the training application seeds it per
sample (:class:`ldb_ds.train.data.SeededDataset`).

Bad files: an ImageFolder image that cannot be decoded raises :class:`BadImageError` naming the
file (ldb-train can skip such samples: :class:`ldb_ds.train.data.SkipBadImages`). A present but
empty dataset directory is an error naming it.
"""

from __future__ import annotations

import importlib.resources
import os
import pickle
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "synthetic")

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}


class DatasetError(RuntimeError):
    """A dataset that is missing, malformed or asked for with impossible options."""


class BadImageError(DatasetError):
    """An image file that cannot be read or decoded; the message names the file."""


@dataclass
class DataBundle:
    """What an application needs to know about a dataset."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    img_size: int
    in_chans: int = 3
    classes: Sequence[str] = field(default_factory=list)
    source: str = ""

    def describe(self) -> str:
        return (f"{self.name}: {len(self.train)} train / {len(self.test)} test images, "
                f"{self.num_classes} classes, {self.in_chans}x{self.img_size}x{self.img_size}"
                + (f" ({self.source})" if self.source else ""))


def build_datasets(
    name: str = "digits",
    data_dir: str | os.PathLike | None = None,
    img_size: int | None = None,
    augment: bool = True,
    download: bool = False,
    verify: bool = True,
    synthetic_train_size: int = 50_000,
    synthetic_test_size: int = 10_000,
    synthetic_num_classes: int = 10,
    seed: int = 0,
) -> DataBundle:
    """Build the train and test splits of dataset ``name`` (see the module docstring).

    ``img_size`` defaults to the dataset's native size (32 for digits, CIFAR and synthetic;
    224 for ImageFolder).
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")
    if img_size is not None and (not isinstance(img_size, int) or img_size < 8):
        raise DatasetError(f"img_size must be an integer >= 8, got {img_size!r}")
    if name == "digits":
        return _digits(img_size or 32, augment)
    if name in ("cifar10", "cifar100"):
        return _cifar(name, data_dir, img_size or 32, augment, download, verify)
    if name == "imagefolder":
        return _imagefolder(data_dir, img_size or 224, augment)
    return _synthetic(img_size or 32, synthetic_num_classes, synthetic_train_size,
                      synthetic_test_size, seed)


# --------------------------------------------------------------------------------------------
# digits (bundled)

def digits_path() -> str:
    """Filesystem path of the bundled ``digits.npz``."""
    return str(importlib.resources.files("ldb_ds.workloads") / "assets" / "digits.npz")


class TensorImageDataset(Dataset):
    """uint8 images held in memory as one tensor (N, C, H, W), normalised on access.

    Augmentation is done on tensors (no PIL round trip), which keeps the bundled data fast on a
    CPU: a random shift of up to ``shift`` pixels (zero padding, then crop).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float],
                 std: Sequence[float], img_size: int, shift: int = 0) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DatasetError(f"expected uint8 images of shape (N, C, H, W), got "
                               f"{tuple(images.shape)} {images.dtype}")
        if images.shape[-1] != img_size:
            images = torch.nn.functional.interpolate(
                images.float(), size=(img_size, img_size), mode="bilinear",
                align_corners=False).round().clamp(0, 255).to(torch.uint8)
        self.images = images
        self.labels = labels.long()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.shift = shift

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        x = self.images[index].float().div_(255.0)
        if self.shift:
            s = self.shift
            h, w = x.shape[-2:]
            dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
            x = torch.nn.functional.pad(x, (s, s, s, s))[:, dy:dy + h, dx:dx + w]
        x = (x - self.mean) / self.std
        return x, int(self.labels[index])


def _digits(img_size: int, augment: bool) -> DataBundle:
    path = digits_path()
    if not os.path.isfile(path):
        raise DatasetError(f"the bundled digits data is missing: looked for {path}. Reinstall "
                           "ldb_ds or regenerate it with `python launch/make_digits.py`.")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test", "classes")}
            source = str(z["source"]) if "source" in z else "sklearn.datasets.load_digits"
    except Exception as err:  # zipfile / KeyError / ValueError: a broken file
        raise DatasetError(f"the bundled digits data at {path} is malformed ({err}); regenerate "
                           "it with `python launch/make_digits.py`.") from err

    def to_rgb(x: np.ndarray) -> torch.Tensor:  # (N, H, W) grey -> (N, 3, H, W)
        return torch.from_numpy(x).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()

    x_tr, x_te = to_rgb(arrays["x_train"]), to_rgb(arrays["x_test"])
    # Normalise with the training split's own statistics (the three channels are equal).
    mean = float(x_tr.float().mean() / 255.0)
    std = float(x_tr.float().std() / 255.0)
    shift = max(1, img_size // 16) if augment else 0
    train = TensorImageDataset(x_tr, torch.from_numpy(arrays["y_train"]), [mean] * 3, [std] * 3,
                               img_size, shift=shift)
    test = TensorImageDataset(x_te, torch.from_numpy(arrays["y_test"]), [mean] * 3, [std] * 3,
                              img_size)
    classes = [str(c) for c in arrays["classes"]]
    return DataBundle("digits", train, test, len(classes), img_size, 3, classes, source)


# --------------------------------------------------------------------------------------------
# CIFAR through torchvision

def _cifar_class(name: str, verify: bool):
    from torchvision.datasets import CIFAR10, CIFAR100

    if verify:
        return CIFAR10 if name == "cifar10" else CIFAR100
    return __getattr__("CIFAR10Unverified" if name == "cifar10" else "CIFAR100Unverified")


_UNVERIFIED: dict[str, type] = {}


def __getattr__(attr: str):
    """PEP 562: ``CIFAR10Unverified`` and ``CIFAR100Unverified``, made on first use.

    Module attributes, not local classes, because a DataLoader worker started by forkserver or
    spawn (ldb-train's default, Python 3.14's) unpickles the dataset and looks its class up by
    name in this module, in a process that never called :func:`_cifar_class`.
    """
    if attr not in ("CIFAR10Unverified", "CIFAR100Unverified"):
        raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
    if attr not in _UNVERIFIED:
        from torchvision.datasets import CIFAR10, CIFAR100

        base = CIFAR10 if attr == "CIFAR10Unverified" else CIFAR100
        # torchvision's check_integrity(path, md5=None) only checks that the file exists: the same
        # loading code, minus the checksums of the official files.
        _UNVERIFIED[attr] = type(attr, (base,), {
            "__module__": __name__, "__qualname__": attr,
            "train_list": [[f, None] for f, _ in base.train_list],
            "test_list": [[f, None] for f, _ in base.test_list],
            "meta": {**base.meta, "md5": None},
        })
    return _UNVERIFIED[attr]


def _cifar(name: str, data_dir, img_size: int, augment: bool, download: bool,
           verify: bool) -> DataBundle:
    from torchvision import transforms as T

    cls = _cifar_class(name, verify)
    url = _CIFAR_URLS[name]
    if data_dir is None:
        raise DatasetError(f"dataset {name} needs a data directory (--data-dir): the folder that "
                           f"holds {cls.base_folder}/ (torchvision's layout). Get the data with "
                           f"--download, or download {url} and extract it into that folder.")
    root = os.path.abspath(os.fspath(data_dir))
    folder = os.path.join(root, cls.base_folder)
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    train_tf = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []
    resize = [T.Resize(img_size)] if img_size != 32 else []
    post = [T.ToTensor(), T.Normalize(mean, std)]
    how = (f"Run with --download (needs internet), or download {url} and extract it into "
           f"{root} (it unpacks to {cls.base_folder}/).")
    if not download and not os.path.isdir(folder):
        raise DatasetError(f"{name} not found: looked for the folder {folder} (torchvision's "
                           f"layout under --data-dir {root}). {how}")
    if not download:
        expected = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        missing = [f for f in expected if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise DatasetError(f"{name} in {folder} is incomplete: missing {', '.join(missing)}. "
                               + how)
    try:
        train = cls(root, train=True, download=download,
                    transform=T.Compose(resize + train_tf + post))
        test = cls(root, train=False, download=False, transform=T.Compose(resize + post))
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted ..."
        raise DatasetError(
            f"{name} in {folder} failed torchvision's checks ({err}). The files do not match the "
            f"official MD5 sums: a partial or corrupted download? Delete the folder, then: {how} "
            "For a folder you built yourself in the same format, pass --no-verify-data.") from err
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as err:
        raise DatasetError(f"{name} in {folder} is malformed: {type(err).__name__}: {err}. "
                           f"Expected torchvision's CIFAR python format. {how}") from err
    return DataBundle(name, train, test, len(train.classes), img_size, 3, list(train.classes),
                      f"torchvision.datasets.{cls.__mro__[0].__name__} from {folder}")


# --------------------------------------------------------------------------------------------
# ImageFolder

def load_image(path: str):
    """torchvision's image loader, with a clear error naming a file that cannot be decoded.

    PIL decodes lazily; ``convert("RGB")`` (inside torchvision's loader) forces the whole
    decode, so a truncated file fails here, not later.
    """
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except (OSError, ValueError, SyntaxError) as err:  # PIL.UnidentifiedImageError is an OSError
        raise BadImageError(f"unreadable image {path}: {type(err).__name__}: {err}. Remove or replace the "
                            "file, or pass --skip-bad-images to skip such files") from None


def _check_class_folders(split_dir: str, layout: str) -> None:
    """A split folder that is present but empty, or with empty class folders, named."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not classes:
        what = "is empty" if not os.listdir(split_dir) else "has no class sub-folders"
        raise DatasetError(f"imagefolder: {split_dir} {what}: expected {layout}")

    def has_image(folder: str) -> bool:
        for _, _, files in os.walk(folder, followlinks=True):
            if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
                return True
        return False

    empty = [os.path.join(split_dir, c) for c in classes if not has_image(os.path.join(split_dir, c))]
    if empty:
        raise DatasetError(f"imagefolder: no image files ({', '.join(IMG_EXTENSIONS)}) in "
                           f"{', '.join(empty[:5])}{f' and {len(empty) - 5} more' if len(empty) > 5 else ''}")


def _imagefolder(data_dir, img_size: int, augment: bool) -> DataBundle:
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    layout = "<data-dir>/train/<class>/<image> and <data-dir>/val/<class>/<image>"
    if data_dir is None:
        raise DatasetError(f"dataset imagefolder needs --data-dir laid out as {layout} "
                           "(the ImageNet layout).")
    root = os.path.abspath(os.fspath(data_dir))
    if os.path.isdir(root) and not os.listdir(root):
        raise DatasetError(f"imagefolder: the data directory {root} is empty: expected {layout}")
    train_dir = os.path.join(root, "train")
    test_dir = next((os.path.join(root, d) for d in ("val", "test")
                     if os.path.isdir(os.path.join(root, d))), None)
    if not os.path.isdir(train_dir) or test_dir is None:
        raise DatasetError(f"imagefolder not found: looked for {train_dir} and "
                           f"{os.path.join(root, 'val')} (or test). Expected {layout}; for "
                           "ImageNet, extract ILSVRC2012 into train/ and val/ with one folder "
                           "per class.")
    _check_class_folders(train_dir, layout)
    _check_class_folders(test_dir, layout)
    crop_pct = 0.875
    if augment:
        train_tf = [T.RandomResizedCrop(img_size), T.RandomHorizontalFlip()]
    else:
        train_tf = [T.Resize(int(img_size / crop_pct)), T.CenterCrop(img_size)]
    test_tf = [T.Resize(int(img_size / crop_pct)), T.CenterCrop(img_size)]
    post = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    try:
        train = ImageFolder(train_dir, transform=T.Compose(train_tf + post), loader=load_image)
        test = ImageFolder(test_dir, transform=T.Compose(test_tf + post), loader=load_image)
    except (FileNotFoundError, RuntimeError) as err:
        raise DatasetError(f"imagefolder at {root} is malformed: {err}. Expected {layout}.") from err
    if train.classes != test.classes:
        raise DatasetError(f"imagefolder at {root}: the class folders differ between {train_dir} "
                           f"({len(train.classes)}) and {test_dir} ({len(test.classes)}); both "
                           "splits need the same class sub-folders.")
    return DataBundle("imagefolder", train, test, len(train.classes), img_size, 3,
                      list(train.classes), f"torchvision.datasets.ImageFolder at {root}")


# --------------------------------------------------------------------------------------------
# synthetic

class SyntheticDataset(Dataset):
    """Random normal images with random labels, generated once from ``seed``.

    To keep memory small for large ``length`` a bank of at most 1024 images is generated and
    indexed modulo its size; labels are drawn for every index.
    """

    def __init__(self, length: int, num_classes: int, img_size: int, in_chans: int = 3,
                 seed: int = 0, bank: int = 1024) -> None:
        if length < 1 or num_classes < 1:
            raise DatasetError(f"synthetic dataset needs length >= 1 and num_classes >= 1, got "
                               f"{length}, {num_classes}")
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(min(bank, length), in_chans, img_size, img_size, generator=g)
        self.labels = torch.randint(0, num_classes, (length,), generator=g)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.images[index % self.images.shape[0]], int(self.labels[index])


def _synthetic(img_size: int, num_classes: int, n_train: int, n_test: int,
               seed: int) -> DataBundle:
    train = SyntheticDataset(n_train, num_classes, img_size, seed=seed)
    test = SyntheticDataset(n_test, num_classes, img_size, seed=seed + 1)
    return DataBundle("synthetic", train, test, num_classes, img_size, 3,
                      [str(i) for i in range(num_classes)], "random tensors (throughput only)")


# --------------------------------------------------------------------------------------------
# evaluation split across ranks

class ShardedEval(Dataset):
    """Rank ``rank``'s share of ``dataset`` (indices rank, rank + world, ...), padded with ignored samples.

    A DistributedSampler pads the last batch with repeats, which would count some test images
    twice; evaluating disjoint shards and summing the counts gives the exact test accuracy.
    Every shard has the same length, ``ceil(len(dataset) / world_size)``, because evaluation is
    collective: at ZeRO-3 every forward all-gathers parameters, and the batches are agreed
    across ranks (:func:`ldb_ds.workloads.batches.agreed_batches`), so a rank with one batch fewer
    would leave the others waiting. A shard short of that length is padded with a repeat of a real
    image whose label is :data:`IGNORE_LABEL`; :func:`ldb_ds.workloads.evaluation.validate` counts
    no such sample.
    """

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        self.dataset = dataset
        self.indices = list(range(rank, len(dataset), world_size))
        self.length = -(-len(dataset) // world_size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        if i < len(self.indices):
            return self.dataset[self.indices[i]]
        item = self.dataset[0]  # padding: any readable image, never counted
        if item is None:
            return None
        label = item[1]  # of the dataset's label type, so that the batch collates
        return item[0], torch.full_like(label, IGNORE_LABEL) if torch.is_tensor(label) else IGNORE_LABEL


IGNORE_LABEL = -100
"""The label of a padding sample (``torch.nn.CrossEntropyLoss``'s default ``ignore_index``)."""


# --------------------------------------------------------------------------------------------
# errors raised in DataLoader workers

def unwrap_error(err: BaseException) -> str:
    """The message of a dataset error, also when a DataLoader worker re-raised it (last line)."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(err).__name__
    return last.split(": ", 1)[1] if last.startswith(("BadImageError:", "DatasetError:", "ldb_ds.")) else last


__all__ = ["DATASETS", "DataBundle", "DatasetError", "BadImageError", "build_datasets", "digits_path",
           "TensorImageDataset", "SyntheticDataset", "ShardedEval", "IGNORE_LABEL", "load_image", "unwrap_error"]

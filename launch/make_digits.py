#!/usr/bin/env python
"""Regenerate ``ldb_ds/workloads/assets/digits.npz``, the bundled default dataset.

Source: scikit-learn's copy of the UCI optical handwritten digits
(``sklearn.datasets.load_digits``: 1797 greyscale 8x8 images, pixel values 0-16,
10 classes), which ships inside scikit-learn, so nothing is downloaded.

What this script does, deterministically:

1. scale the 0-16 pixels to 0-255;
2. resize each 8x8 image to 32x32 with bilinear interpolation (``torch.nn.functional.interpolate``,
   ``align_corners=False``) so CIFAR-size models and stems apply unchanged;
3. keep one grey channel in the file (a third of the size); the dataset class
   (``ldb_ds.workloads.data``) repeats it into RGB when loading, so models see 3 channels;
4. split 80/20 into train and test, stratified by class, with a fixed seed (0).

The file stores ``x_train`` (N, 32, 32) uint8, ``y_train`` (N,) int64 and the same for
test, plus ``classes`` and a ``source`` note. Run from the repository root::

    python launch/make_digits.py            # writes ldb_ds/workloads/assets/digits.npz
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SIZE = 32
SEED = 0
TEST_FRACTION = 0.2


def build(size: int = SIZE, seed: int = SEED) -> dict[str, np.ndarray]:
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) * (255.0 / 16.0))  # (N, 8, 8)
    x = F.interpolate(x[:, None], size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp(0, 255).round().to(torch.uint8)[:, 0].numpy()  # (N, size, size) grey
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=seed, stratify=y)
    return {
        "x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te,
        "classes": np.array([str(i) for i in range(10)]),
        "source": np.array("sklearn.datasets.load_digits (UCI optical recognition of handwritten "
                           f"digits), 8x8 -> {size}x{size} bilinear, grey (repeat to RGB at load), stratified "
                           f"{1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%} split, seed {seed}"),
    }


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    default_out = os.path.join(here, os.pardir, "ldb_ds", "workloads", "assets", "digits.npz")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.normpath(default_out))
    args = ap.parse_args()
    arrays = build()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: train {arrays['x_train'].shape}, test {arrays['x_test'].shape}, "
          f"{os.path.getsize(args.out) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()

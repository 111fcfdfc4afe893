"""Datasets through their real loading code: bundled digits, CIFAR via torchvision, ImageFolder."""

import os
import sys

import numpy as np
import pytest
import torch

from tests.support import train_utils  # noqa: E402

from ldb_ds.workloads.data import (IGNORE_LABEL, DatasetError, ShardedEval, SyntheticDataset,  # noqa: E402
                                   build_datasets, digits_path)


def test_digits_bundled_real_data():
    data = build_datasets("digits")
    assert data.num_classes == 10 and data.img_size == 32 and data.in_chans == 3
    assert (len(data.train), len(data.test)) == (1437, 360)  # all 1797 sklearn digits
    x, y = data.test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey repeated into RGB
    # The split is fixed: the file is the source of truth, labels balanced per class.
    z = np.load(digits_path())
    assert np.bincount(z["y_test"]).min() >= 35
    # The test split is not augmented (deterministic); the training split shifts images.
    assert torch.equal(data.test[5][0], data.test[5][0])
    torch.manual_seed(0)
    shifted = [data.train[3][0] for _ in range(8)]
    assert any(not torch.equal(shifted[0], s) for s in shifted[1:])


def test_digits_match_sklearn():
    """The bundled file is sklearn's digits, resized: regenerate and compare."""
    sys.path.insert(0, os.path.join(train_utils.REPO, "launch"))
    import make_digits

    fresh = make_digits.build()
    z = np.load(digits_path())
    for key in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(fresh[key], z[key], err_msg=key)


def test_digits_resized():
    data = build_datasets("digits", img_size=48, augment=False)
    assert data.train[0][0].shape == (3, 48, 48)


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_folder_through_torchvision(tmp_path, name, classes):
    train_utils.write_cifar_folder(str(tmp_path), name, n_train=25, n_test=7)
    data = build_datasets(name, tmp_path, verify=False)
    assert (len(data.train), len(data.test), data.num_classes) == (25, 7, classes)
    x, y = data.train[0]
    assert x.shape == (3, 32, 32) and 0 <= y < classes
    assert "torchvision.datasets.CIFAR" in data.source
    # The official MD5 sums are checked by default: a home-made folder fails them, clearly.
    with pytest.raises(DatasetError, match="MD5.*--no-verify-data"):
        build_datasets(name, tmp_path)


def test_cifar_missing_dir_says_where_and_how(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as err:
        build_datasets("cifar10", missing)
    msg = str(err.value)
    assert os.path.join(str(missing), "cifar-10-batches-py") in msg
    assert "--download" in msg and "cifar-10-python.tar.gz" in msg
    with pytest.raises(DatasetError, match="--data-dir"):
        build_datasets("cifar100", None)


def test_cifar_incomplete_and_malformed(tmp_path):
    folder = train_utils.write_cifar_folder(str(tmp_path), "cifar10", n_train=10, n_test=4)
    os.remove(os.path.join(folder, "test_batch"))
    with pytest.raises(DatasetError, match="missing test_batch"):
        build_datasets("cifar10", tmp_path, verify=False)
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        f.write(b"this is not a pickle")
    with pytest.raises(DatasetError, match="malformed"):
        build_datasets("cifar10", tmp_path, verify=False)


def test_imagefolder(tmp_path):
    train_utils.write_image_folder(str(tmp_path), classes=("a", "b", "c"), per_class=2)
    data = build_datasets("imagefolder", tmp_path, img_size=32)
    assert data.num_classes == 3 and data.classes == ["a", "b", "c"]
    assert (len(data.train), len(data.test)) == (6, 6)
    x, y = data.test[0]
    assert x.shape == (3, 32, 32) and y == 0


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetError, match="train.*val"):
        build_datasets("imagefolder", tmp_path / "missing")
    train_utils.write_image_folder(str(tmp_path / "x"), classes=("a", "b"), per_class=1,
                                   splits=("train",))
    with pytest.raises(DatasetError, match="val"):
        build_datasets("imagefolder", tmp_path / "x")
    # Present but empty: the error names the directory.
    (tmp_path / "y" / "train").mkdir(parents=True)
    (tmp_path / "y" / "val").mkdir()
    with pytest.raises(DatasetError, match=f"{tmp_path / 'y' / 'train'} is empty"):
        build_datasets("imagefolder", tmp_path / "y")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=f"data directory {tmp_path / 'empty'} is empty"):
        build_datasets("imagefolder", tmp_path / "empty")
    train_utils.write_image_folder(str(tmp_path / "z"), classes=("a", "b"), per_class=1)
    (tmp_path / "z" / "val" / "c").mkdir()
    (tmp_path / "z" / "val" / "c" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=f"no image files .* in {tmp_path / 'z' / 'val' / 'c'}$"):
        build_datasets("imagefolder", tmp_path / "z")


def test_unreadable_image_is_named_or_skipped(tmp_path):
    """A truncated PNG and a text file named .jpg: an error naming the file, or skipped and counted."""
    from torch.utils.data import DataLoader

    from ldb_ds.train.data import SeededDataset, SkipBadImages, collate_skipping
    from ldb_ds.workloads.data import BadImageError, unwrap_error

    train_utils.write_image_folder(str(tmp_path), classes=("a", "b"), per_class=3, size=16)
    truncated = tmp_path / "train" / "a" / "1.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    (tmp_path / "train" / "b" / "9.jpg").write_text("not a jpeg")
    data = build_datasets("imagefolder", tmp_path, img_size=16)
    index = [p for p, _ in data.train.samples].index(str(truncated))
    with pytest.raises(BadImageError, match=f"unreadable image {truncated}.*--skip-bad-images"):
        data.train[index]
    # Through a DataLoader worker the error arrives re-raised; the message still names the file.
    loader = DataLoader(data.train, batch_size=len(data.train), num_workers=1)
    with pytest.raises(BadImageError) as err:
        next(iter(loader))
    assert unwrap_error(err.value).startswith(f"unreadable image {truncated}")
    skipping = DataLoader(SeededDataset(SkipBadImages(data.train), seed=0), batch_size=4, num_workers=1,
                          collate_fn=collate_skipping)
    batches = list(skipping)
    assert sum(int(b[2]) for b in batches) == 2
    assert sum(b[0].shape[0] for b in batches) == len(data.train) - 2


def test_seeded_dataset_draws_per_epoch_and_index():
    """The augmentation of a sample depends on (seed, epoch, index) only: not on order or workers."""
    from torch.utils.data import DataLoader

    from ldb_ds.train.data import SeededDataset

    data = build_datasets("digits")  # training split: random shifts
    ds = SeededDataset(data.train, seed=7)
    ds.set_epoch(3)
    first = [ds[i][0] for i in (5, 6, 7)]
    torch.manual_seed(123)  # whatever the global state was
    again = [ds[i][0] for i in (7, 6, 5)][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    by_worker = next(iter(DataLoader(ds, batch_size=3, sampler=[5, 6, 7], num_workers=2)))[0]
    assert all(torch.equal(a, b) for a, b in zip(first, by_worker))
    ds.set_epoch(4)
    assert any(not torch.equal(a, ds[i][0]) for a, i in zip(first, (5, 6, 7)))


def test_synthetic_is_deterministic():
    a = SyntheticDataset(100, 7, 16, seed=3)
    b = SyntheticDataset(100, 7, 16, seed=3)
    assert torch.equal(a[42][0], b[42][0]) and a[42][1] == b[42][1]
    data = build_datasets("synthetic", synthetic_train_size=64, synthetic_test_size=16,
                          synthetic_num_classes=5)
    assert data.num_classes == 5 and len(data.train) == 64


def test_sharded_eval_covers_each_image_once():
    ds = SyntheticDataset(11, 2, 8)
    shards = [ShardedEval(ds, r, 3) for r in range(3)]
    idx = sorted(i for s in shards for i in s.indices)
    assert idx == list(range(11))
    # Equal lengths (evaluation is collective); the padding is a real image labelled to be ignored.
    assert [len(s) for s in shards] == [4, 4, 4]
    assert [s[3][1] for s in shards] == [ds[9][1], ds[10][1], IGNORE_LABEL]
    assert torch.equal(shards[2][3][0], ds[0][0])


def test_unknown_dataset():
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'.*digits"):
        build_datasets("mnist")


@pytest.mark.parametrize("method", ["forkserver", "fork"])
@pytest.mark.parametrize("kind", ["digits", "synthetic", "cifar10", "imagefolder"])
def test_every_dataset_loads_in_persistent_workers(tmp_path, kind, method):
    """ldb-train starts persistent workers with forkserver (--worker-start-method's default), which
    sends each worker the dataset pickled, once: every kind, wrapped as ldb-train wraps it, arrives
    whole, and in every epoch draws in the worker exactly the augmentation the rank draws itself
    (with --worker-start-method fork too, where nothing is pickled: the epoch is shared memory)."""
    from torch.utils.data import DataLoader

    from ldb_ds.train import faults
    from ldb_ds.train.data import SeededDataset, SkipBadImages, collate_skipping

    if kind == "cifar10":
        train_utils.write_cifar_folder(str(tmp_path), kind, n_train=12, n_test=4)
    elif kind == "imagefolder":
        train_utils.write_image_folder(str(tmp_path), classes=("a", "b"), per_class=6, size=16)
    data = build_datasets(kind, tmp_path if kind in ("cifar10", "imagefolder") else None, verify=False,
                          synthetic_train_size=12, synthetic_test_size=4)
    for dataset in (SeededDataset(data.train, seed=5), SeededDataset(SkipBadImages(data.train), seed=5)):
        indices = [3, 0, 7, 5]
        # Persistent, as ldb-train's: the dataset reaches the worker once, the epoch through shared memory.
        loader = DataLoader(dataset, batch_size=4, sampler=indices, num_workers=1, collate_fn=collate_skipping,
                            multiprocessing_context=faults.worker_context(method, ["SIGUSR1"]),
                            persistent_workers=True)
        for epoch in (2, 3):
            dataset.set_epoch(epoch)
            x, y, skipped = next(iter(loader))
            expected = [dataset[i] for i in indices]
            assert int(skipped) == 0 and y.tolist() == [int(t) for _, t in expected]
            assert torch.equal(x, torch.stack([e for e, _ in expected])), (kind, method, epoch)

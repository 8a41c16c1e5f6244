"""The data module reads CIFAR-10 files it did not download, splits them, and scales batches."""

import os
import pickle
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import REAL_DATA, run_train, write_cifar10
from vae_lightning.core.elbo import to_unit_interval
from vae_lightning.data.cifar10 import (
    BASE_FOLDER,
    CIFAR10DataModule,
    DatasetCorruptError,
    DatasetNotFoundError,
    DeviceBatches,
    ensure_cifar10,
    random_hflip,
    read_cifar10,
)


def test_reads_the_pickle_layout(cifar_dir):
    images, labels = read_cifar10(cifar_dir, train=True)
    assert images.shape == (80, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (80,) and labels.dtype == torch.int64
    with open(cifar_dir / BASE_FOLDER / "data_batch_1", "rb") as f:
        first = pickle.load(f)
    # Row layout: 1024 red, then 1024 green, then 1024 blue values, row-major.
    assert images[0, 1, 0, 5].item() == first["data"][0, 1024 + 5]
    test_images, _ = read_cifar10(cifar_dir, train=False)
    assert test_images.shape == (16, 3, 32, 32)


def test_split_is_seeded_disjoint_and_complete(cifar_dir):
    def split(seed):
        dm = CIFAR10DataModule(str(cifar_dir), val_fraction=0.25, split_seed=seed, download=False)
        dm.setup("fit")
        return dm.train_set.tensors[0], dm.val_set.tensors[0]

    train, val = split(0)
    assert len(train) == 60 and len(val) == 20
    all_images = read_cifar10(cifar_dir, train=True)[0].flatten(1)
    rows = {tuple(r.tolist()) for r in torch.cat([train, val]).flatten(1)}
    assert rows == {tuple(r.tolist()) for r in all_images}
    assert torch.equal(split(0)[1], val)
    assert not torch.equal(split(1)[1], val)


def test_loaders_give_uint8_batches_and_the_test_set(cifar_dir):
    dm = CIFAR10DataModule(str(cifar_dir), batch_size=8, num_workers=0, download=False)
    dm.prepare_data()
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.uint8 and y.shape == (8,)
    assert sum(len(b[0]) for b in dm.test_dataloader()) == 16
    scaled, labels = dm.on_after_batch_transfer((x, y), 0)
    assert scaled.dtype == torch.float32 and torch.equal(labels, y)


def test_scaling_puts_each_pixel_in_its_bin():
    k = torch.arange(256, dtype=torch.uint8).repeat(50)
    x = to_unit_interval(k, dequantize=True)
    assert torch.all(x >= k / 256) and torch.all(x <= (k.float() + 1) / 256)
    assert x.std() > 0 and not torch.equal(x, to_unit_interval(k, dequantize=True))
    torch.testing.assert_close(to_unit_interval(k, dequantize=False), (k.float() + 0.5) / 256)


def test_random_flip_mirrors_about_half_the_images():
    torch.manual_seed(0)
    x = torch.rand(1000, 3, 4, 4)
    y = random_hflip(x)
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    kept = (y == x).flatten(1).all(1)
    assert torch.all(flipped ^ kept)
    assert 400 < flipped.sum() < 600


def test_missing_data_without_download_names_the_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        ensure_cifar10(tmp_path / "nowhere", download=False)
    assert str(tmp_path / "nowhere" / BASE_FOLDER) in str(err.value)
    assert "data.data_dir" in str(err.value) and "data.download=true" in str(err.value)


def test_missing_data_and_no_network_names_the_folder(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(DatasetNotFoundError) as err:
        ensure_cifar10(tmp_path, download=True)
    message = str(err.value)
    assert str(tmp_path / BASE_FOLDER) in message and "download failed" in message


def denied(*paths: Path):
    """``os.access`` as for a user without permission on ``paths`` (the tests run as root)."""
    real_access = os.access

    def access(path, mode, **kwargs):
        return Path(path) not in paths and real_access(path, mode, **kwargs)

    return access


def test_a_data_folder_without_permission_is_named(tmp_path, monkeypatch):
    write_cifar10(tmp_path, images_per_file=2)
    folder = tmp_path / BASE_FOLDER
    monkeypatch.setattr("vae_lightning.data.cifar10.os.access", denied(folder))
    with pytest.raises(PermissionError) as err:
        ensure_cifar10(tmp_path, download=True)
    assert f"{folder} cannot be read (no permission)" in str(err.value)
    assert "data.data_dir" in str(err.value)


def test_a_batch_file_without_permission_is_named(tmp_path, monkeypatch):
    write_cifar10(tmp_path, images_per_file=2)
    batch = tmp_path / BASE_FOLDER / "data_batch_2"
    real_open = open

    def no_read(path, *args, **kwargs):
        if Path(path) == batch:
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_read)
    with pytest.raises(PermissionError) as err:
        read_cifar10(tmp_path, train=True)
    assert f"{batch} cannot be read: Permission denied; fix its permissions" in str(err.value)


def test_no_download_into_a_folder_without_write_permission(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    monkeypatch.setattr("vae_lightning.data.cifar10.os.access", denied(tmp_path))
    with pytest.raises(PermissionError) as err:
        ensure_cifar10(tmp_path / "data", download=True)
    assert f"{tmp_path} is not writable (no permission)" in str(err.value)
    assert "set data.data_dir to a writable folder" in str(err.value)
    assert not (tmp_path / "data").exists()


def test_present_files_are_used_without_download(tmp_path, monkeypatch):
    write_cifar10(tmp_path, images_per_file=2)

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    ensure_cifar10(tmp_path, download=True)


def test_malformed_batch_is_reported_with_its_file(tmp_path):
    write_cifar10(tmp_path, images_per_file=2)
    bad = tmp_path / BASE_FOLDER / "data_batch_3"
    with open(bad, "wb") as f:
        pickle.dump({"data": torch.zeros(2, 100, dtype=torch.uint8).numpy(), "labels": [0, 1]}, f)
    with pytest.raises(DatasetCorruptError, match=r"data_batch_3.*delete it"):
        read_cifar10(tmp_path, train=True)


class LeavesAMarker:
    """Unpickled, it would run ``touch`` on a marker file: what a crafted data file can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_crafted_batch(root: Path, marker: Path) -> Path:
    """A CIFAR-10 folder whose data_batch_2 runs a command when unpickled with pickle.load."""
    write_cifar10(root, images_per_file=2)
    path = root / BASE_FOLDER / "data_batch_2"
    with open(path, "wb") as f:
        pickle.dump({"data": LeavesAMarker(marker), "labels": [0, 1]}, f)
    return path


def test_a_crafted_batch_is_refused_without_running_anything(tmp_path):
    marker = tmp_path / "marker"
    path = write_crafted_batch(tmp_path / "data", marker)
    with pytest.raises(DatasetCorruptError) as err:
        read_cifar10(tmp_path / "data", train=True)
    assert str(path) in str(err.value) and "which a CIFAR-10 batch never holds" in str(err.value)
    assert not marker.exists()
    with open(path, "rb") as f:  # the file does run code under pickle.load
        pickle.load(f)
    assert marker.exists()


@pytest.mark.cli
def test_the_train_command_refuses_a_crafted_batch_in_one_line(tmp_path):
    marker = tmp_path / "marker"
    path = write_crafted_batch(tmp_path / "data", marker)
    proc = run_train(
        [f"data.data_dir={tmp_path / 'data'}", "logger=csv"], tmp_path, expect_ok=False
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"Error: {path} is not a CIFAR-10 batch" in proc.stderr and not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_garbage_batch_is_named_with_what_to_do(tmp_path, damage):
    write_cifar10(tmp_path, images_per_file=4)
    path = tmp_path / BASE_FOLDER / "test_batch"
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2] if damage == "truncate" else b"not a pickle")
    with pytest.raises(DatasetCorruptError) as err:
        read_cifar10(tmp_path, train=False)
    assert str(path) in str(err.value) and "download it again" in str(err.value)


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="no real CIFAR-10 at ../shared/data")
def test_real_cifar10_sizes():
    dm = CIFAR10DataModule(str(REAL_DATA), download=False)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (45_000, 5_000, 10_000)


@pytest.mark.parametrize(
    ("num_images", "world_size", "batch_size"), [(100, 3, 8), (72, 2, 16), (45, 1, 7)]
)
def test_device_batches_shard_every_index_once_per_epoch(num_images, world_size, batch_size):
    images = torch.arange(num_images)
    ranks = [
        DeviceBatches(
            images, images, batch_size, shuffle=True, seed=5, rank=r, world_size=world_size
        )
        for r in range(world_size)
    ]
    assert len({len(b) for b in ranks}) == 1  # the same number of steps on every rank
    orders = []
    for epoch in (0, 1):
        batches = [b.batch_indices(epoch) for b in ranks]
        assert all(len(per_rank) == len(ranks[0]) for per_rank in batches)
        assert all(0 < len(idx) <= batch_size for per_rank in batches for idx in per_rank)
        seen = torch.cat([idx for per_rank in batches for idx in per_rank])
        assert sorted(seen.tolist()) == list(range(num_images))  # each image exactly once
        orders.append(seen)
    assert not torch.equal(orders[0], orders[1])  # reshuffled each epoch
    again = DeviceBatches(
        images, images, batch_size, shuffle=True, seed=5, rank=0, world_size=world_size
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(again.batch_indices(1), ranks[0].batch_indices(1), strict=True)
    )


def test_device_batches_yield_images_with_their_labels():
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 3, 2, 2)
    labels = torch.arange(20)
    for x, y in DeviceBatches(images, labels, batch_size=6, shuffle=True, epoch=lambda: 3):
        assert torch.equal(x[:, 0, 0, 0].long(), y)


def test_device_path_matches_the_dataloader_path(cifar_dir):
    def epoch_images(on_device):
        dm = CIFAR10DataModule(
            str(cifar_dir), batch_size=16, num_workers=0, on_device=on_device, download=False
        )
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert isinstance(loader, DeviceBatches) == on_device
        x = torch.cat([b[0] for b in loader])
        val = torch.cat([b[0] for b in dm.val_dataloader()])
        return x, val

    (fast, fast_val), (slow, slow_val) = epoch_images(True), epoch_images(False)
    assert torch.equal(fast_val, slow_val)  # same split, same order
    assert fast.shape == slow.shape
    assert sorted(map(tuple, fast.flatten(1).tolist())) == sorted(
        map(tuple, slow.flatten(1).tolist())
    )
    torch.testing.assert_close(fast.float().mean(), slow.float().mean())
    torch.testing.assert_close(fast.float().std(), slow.float().std())


def test_flips_are_applied_on_the_device_path_in_training_only(cifar_dir):
    dm = CIFAR10DataModule(str(cifar_dir), batch_size=64, random_flip=True, dequantize=False)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    expected = to_unit_interval(images, dequantize=False)
    for training, should_flip in ((True, True), (False, False)):
        dm.trainer = SimpleNamespace(training=training)
        torch.manual_seed(0)
        x, _ = dm.on_after_batch_transfer((images, labels), 0)
        flipped = (x == expected.flip(-1)).flatten(1).all(1) & ~(x == expected).flatten(1).all(1)
        assert bool(flipped.any()) == should_flip


def test_the_same_global_batches_on_one_and_on_two_ranks():
    images = torch.arange(72)
    one = DeviceBatches(images, images, 16, shuffle=True, seed=3).batch_indices(epoch=2)
    two = [
        DeviceBatches(images, images, 8, shuffle=True, seed=3, rank=r, world_size=2) for r in (0, 1)
    ]
    halves = [b.batch_indices(epoch=2) for b in two]
    assert len(one) == len(halves[0]) == len(halves[1])
    for whole, a, b in zip(one, *halves, strict=True):
        assert sorted(torch.cat([a, b]).tolist()) == sorted(whole.tolist())
        assert abs(len(a) - len(b)) <= 1

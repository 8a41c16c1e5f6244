"""CIFAR-10 as a LightningDataModule: uint8 tensors in memory, scaled to [0, 1] per batch.

The files are the official python batches (``cifar-10-batches-py/``). torchvision downloads them
when they are missing; when they are present they are read directly, without torchvision's md5
check, so that any folder in the same pickle layout (a test fixture, a mirror) works.

Batches come from a DataLoader, or (``on_device``) straight from the uint8 tensors moved once to the
training device, sharded by rank under DDP.

Pixel scaling: an 8-bit value k becomes x = (k + u) / 256 with u ~ U[0, 1) (uniform
dequantization, the default) or u = 1/2 (bin centres). Either way the 256 bins of [0, 1] have
width 1/256, which is what ``vae_lightning.core.elbo.bits_per_dim`` assumes.
"""

import math
import os
import pickle
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from vae_lightning.core.elbo import to_unit_interval
from vae_lightning.errors import UserError

try:
    from numpy._core.multiarray import _reconstruct as numpy_reconstruct
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct as numpy_reconstruct

BASE_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)


class DatasetNotFoundError(UserError, FileNotFoundError):
    """CIFAR-10 is not in the data folder and could not be downloaded."""


class DatasetCorruptError(UserError, ValueError):
    """A CIFAR-10 batch file cannot be read as one."""


BATCH_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): numpy.ndarray,
    ("numpy", "dtype"): numpy.dtype,
    ("numpy.core.multiarray", "_reconstruct"): numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): numpy_reconstruct,
}
"""The classes and functions a CIFAR-10 batch names (its arrays, pickled by numpy 1 or 2)."""


class BatchUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR-10's python batches that builds only what they hold: dicts,
    lists, strings, bytes, numbers and numpy arrays. Any other class or function a file names
    is refused, so a crafted file runs nothing."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return BATCH_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which a CIFAR-10 batch never holds"
            ) from None


def read_cifar10(root: str | Path, train: bool) -> tuple[Tensor, Tensor]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64 from the python batch files."""
    folder = Path(root) / BASE_FOLDER
    images, labels = [], []
    for name in TRAIN_FILES if train else TEST_FILES:
        path = folder / name
        fix = "delete it to download it again, or replace it with the official file"
        try:
            with open(path, "rb") as f:
                entry = BatchUnpickler(f, encoding="latin1").load()
            data = torch.as_tensor(entry["data"], dtype=torch.uint8)
        except PermissionError as err:
            raise PermissionError(
                f"{path} cannot be read: {err.strerror}; fix its permissions"
            ) from None
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
            raise DatasetCorruptError(f"{path} is not a CIFAR-10 batch ({err!r}): {fix}") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DatasetCorruptError(
                f"{path}: expected rows of 3072 pixels, got {tuple(data.shape)}: {fix}"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(torch.as_tensor(entry.get("labels", entry.get("fine_labels"))))
    return torch.cat(images), torch.cat(labels).long()


def ensure_cifar10(root: str | Path, download: bool = True) -> None:
    """Make sure the batch files are under ``root``, downloading them if allowed."""
    folder = Path(root) / BASE_FOLDER
    if folder.is_dir() and not os.access(folder, os.R_OK | os.X_OK):
        raise PermissionError(
            f"{folder.resolve()} cannot be read (no permission): fix its permissions "
            "(chmod u+rx), or point data.data_dir at a readable copy"
        )
    if all((folder / name).is_file() for name in TRAIN_FILES + TEST_FILES):
        return
    hint = (
        f"CIFAR-10 was not found in {folder.resolve()}. Put the python-version batches there "
        "(data_batch_1..5, test_batch), or point data.data_dir at the folder that holds "
        f"{BASE_FOLDER}/"
    )
    if not download:
        raise DatasetNotFoundError(f"{hint}, or set data.download=true.")
    writable = next(p for p in (folder, *folder.parents) if p.exists())
    if not os.access(writable, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{hint}. It cannot be downloaded there: {writable.resolve()} is not writable "
            "(no permission); set data.data_dir to a writable folder"
        )
    from torchvision.datasets import CIFAR10

    try:
        CIFAR10(root=str(root), train=True, download=True)
    except (urllib.error.URLError, OSError) as err:
        raise DatasetNotFoundError(f"{hint}. The download failed: {err}") from err


def random_hflip(x: Tensor) -> Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, x.flip(-1), x)


class DeviceBatches:
    """Batches drawn by index from uint8 tensors that already live on the training device.

    Each epoch uses a permutation seeded by (``seed``, epoch), the same on every rank, cut into
    ``len(self)`` near-equal global batches; rank r takes every ``world_size``-th image of each
    from position r. So across ranks each image is used once per epoch, every rank makes the
    same number of steps (DDP steps in lockstep), and the k-th global batch is the same images
    whatever the number of ranks (with ``batch_size`` per rank scaled to match).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch: Callable[[], int] = lambda: 0,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.epoch = rank, world_size, epoch

    def __len__(self) -> int:
        return math.ceil(len(self.images) / (self.batch_size * self.world_size))

    def batch_indices(self, epoch: int) -> list[Tensor]:
        """This rank's index batches for ``epoch``: ``len(self)`` of them, near-equal in size."""
        n = len(self.images)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(n)
        global_batches = torch.tensor_split(order.to(self.images.device), len(self))
        return [batch[self.rank :: self.world_size] for batch in global_batches]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for idx in self.batch_indices(self.epoch()):
            yield self.images[idx], self.labels[idx]


class CIFAR10DataModule(L.LightningDataModule):
    """Train/val split of the 50k training images (seeded), and the official 10k test set."""

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 2,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        random_flip: bool = False,
        dequantize: bool = True,
        download: bool = True,
        on_device: bool | str = "auto",
    ) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.random_flip = random_flip
        self.dequantize = dequantize
        self.download = download
        self.on_device = on_device
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def prepare_data(self) -> None:
        ensure_cifar10(self.data_dir, self.download)

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", "validate", None) and self.train_set is None:
            ensure_cifar10(self.data_dir, download=False)
            images, labels = read_cifar10(self.data_dir, train=True)
            generator = torch.Generator().manual_seed(self.split_seed)
            order = torch.randperm(len(images), generator=generator)
            num_val = round(self.val_fraction * len(images))
            val_idx, train_idx = order[:num_val], order[num_val:]
            self.train_set = TensorDataset(images[train_idx], labels[train_idx])
            self.val_set = TensorDataset(images[val_idx], labels[val_idx])
        if stage in ("test", None) and self.test_set is None:
            ensure_cifar10(self.data_dir, download=False)
            self.test_set = TensorDataset(*read_cifar10(self.data_dir, train=False))

    def uses_device_path(self, device: torch.device) -> bool:
        """``on_device`` as set; ``auto``: yes, unless a CUDA device has too little free memory."""
        if self.on_device != "auto":
            return bool(self.on_device)
        if device.type != "cuda":
            return True
        sets = (self.train_set, self.val_set, self.test_set)
        needed = sum(t.numel() for s in sets if s is not None for t in s.tensors)
        return 4 * needed < torch.cuda.mem_get_info(device)[0]

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader | DeviceBatches:
        trainer = self.trainer
        if trainer is None:
            return self.batches(dataset, shuffle, torch.device("cpu"))
        return self.batches(
            dataset,
            shuffle,
            trainer.strategy.root_device,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            epoch=lambda: trainer.current_epoch,
        )

    def batches(
        self,
        dataset: TensorDataset | None,
        shuffle: bool,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        epoch: Callable[[], int] = lambda: 0,
    ) -> DataLoader | DeviceBatches:
        """uint8 batches of ``dataset`` for training on ``device``: drawn there by index (the
        device path), or from a DataLoader (to be moved there, then ``scale``d)."""
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        if self.uses_device_path(device):
            return DeviceBatches(
                *(t.to(device) for t in dataset.tensors),
                batch_size=self.batch_size,
                shuffle=shuffle,
                seed=int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed())),
                rank=rank,
                world_size=world_size,
                epoch=epoch,
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader(self.test_set, shuffle=False)

    def on_after_batch_transfer(
        self, batch: tuple[Tensor, Tensor] | Tensor, dataloader_idx: int
    ) -> tuple[Tensor, Tensor] | Tensor:
        """Scale (and in training, flip) on the device the batch now lives on. A bare tensor is
        the model summary's example input, on [0, 1] already: it passes as it is."""
        if isinstance(batch, Tensor):
            return batch
        images, labels = batch
        training = self.trainer is not None and self.trainer.training
        return self.scale(images, training), labels

    def scale(self, images: Tensor, training: bool) -> Tensor:
        """uint8 images to [0, 1] (``dequantize``), mirrored at random in ``training`` when
        ``random_flip`` is set."""
        x = to_unit_interval(images, self.dequantize)
        return random_hflip(x) if self.random_flip and training else x

"""CIFAR-10 as a LightningDataModule: uint8 tensors in memory, scaled to [0, 1] per batch.

The files are the official python batches (``cifar-10-batches-py/``). torchvision downloads them
when they are missing; when they are present they are read directly, without torchvision's md5
check, so that any folder in the same pickle layout (a test fixture, a mirror) works.

Pixel scaling: an 8-bit value k becomes x = (k + u) / 256 with u ~ U[0, 1) (uniform
dequantization, the default) or u = 1/2 (bin centres). Either way the 256 bins of [0, 1] have
width 1/256, which is what ``vae_lightning.elbo.bits_per_dim`` assumes.
"""

import pickle
import urllib.error
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

BASE_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)


class DatasetNotFoundError(FileNotFoundError):
    """CIFAR-10 is not in the data folder and could not be downloaded."""


def read_cifar10(root: str | Path, train: bool) -> tuple[Tensor, Tensor]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64 from the python batch files."""
    folder = Path(root) / BASE_FOLDER
    images, labels = [], []
    for name in TRAIN_FILES if train else TEST_FILES:
        with open(folder / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data = torch.as_tensor(entry["data"], dtype=torch.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(
                f"{folder / name}: expected rows of 3072 pixels, got {tuple(data.shape)}"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(torch.as_tensor(entry.get("labels", entry.get("fine_labels"))))
    return torch.cat(images), torch.cat(labels).long()


def ensure_cifar10(root: str | Path, download: bool = True) -> None:
    """Make sure the batch files are under ``root``, downloading them if allowed."""
    folder = Path(root) / BASE_FOLDER
    if all((folder / name).is_file() for name in TRAIN_FILES + TEST_FILES):
        return
    hint = (
        f"CIFAR-10 was not found in {folder.resolve()}. Put the python-version batches there "
        "(data_batch_1..5, test_batch), or point data.data_dir at the folder that holds "
        f"{BASE_FOLDER}/"
    )
    if not download:
        raise DatasetNotFoundError(f"{hint}, or set data.download=true.")
    from torchvision.datasets import CIFAR10

    try:
        CIFAR10(root=str(root), train=True, download=True)
    except (urllib.error.URLError, OSError) as err:
        raise DatasetNotFoundError(f"{hint}. The download failed: {err}") from err


def to_unit_interval(images: Tensor, dequantize: bool) -> Tensor:
    """uint8 pixels k -> float (k + u) / 256, u ~ U[0, 1) if ``dequantize`` else u = 1/2."""
    x = images.float()
    offset = torch.rand_like(x) if dequantize else 0.5
    return (x + offset) / 256.0


def random_hflip(x: Tensor) -> Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, x.flip(-1), x)


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

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def on_after_batch_transfer(
        self, batch: tuple[Tensor, Tensor], dataloader_idx: int
    ) -> tuple[Tensor, Tensor]:
        """Scale (and in training, flip) on the device the batch now lives on."""
        images, labels = batch
        x = to_unit_interval(images, self.dequantize)
        if self.random_flip and self.trainer is not None and self.trainer.training:
            x = random_hflip(x)
        return x, labels

"""Fréchet Inception Distance: the statistics of feature sets, cached and resumable, and the
distance between them; the resize that the field's network sees images through (the networks:
``vae_lightning.evaluation.feature_networks``).

Features are reduced on the fly to their sufficient statistics (count, sum, sum of outer
products, in float64). A long pass saves them every chunk, so an interrupted pass resumes where
it stopped; finished statistics of real images are cached, keyed by the data files' hashes and
the protocol.
"""

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from vae_lightning.data.cifar10 import BASE_FOLDER, TEST_FILES, TRAIN_FILES, read_cifar10
from vae_lightning.errors import first_line
from vae_lightning.evaluation.pass_progress import PassProgress
from vae_lightning.files import file_digest, torch_save_atomically, write_text_atomically

log = logging.getLogger(__name__)

INCEPTION_SIZE = 299
DEFAULT_CACHE = Path.home() / ".cache" / "vae_lightning" / "fid"


def tf_bilinear_resize(x: Tensor, size: int = INCEPTION_SIZE) -> Tensor:
    """Resize ``(N, C, H, W)`` to ``size x size`` as TensorFlow 1's ``resize_bilinear`` does
    (no half-pixel centres): output pixel j samples the input at j * H / size, clamped at the
    border. Separable, as two interpolation matrices."""

    def matrix(n_in: int) -> Tensor:
        src = torch.arange(size, dtype=torch.float64) * (n_in / size)
        low = src.floor().long().clamp(max=n_in - 1)
        high = (low + 1).clamp(max=n_in - 1)
        frac = src - low
        weights = torch.zeros(size, n_in, dtype=torch.float64)
        rows = torch.arange(size)
        weights[rows, low] += 1 - frac
        weights[rows, high] += frac
        return weights.to(x)

    return matrix(x.shape[-2]) @ x @ matrix(x.shape[-1]).T


@dataclass
class FeatureStats:
    """Sufficient statistics of a set of feature vectors, in float64."""

    count: int
    total: Tensor
    outer: Tensor

    @classmethod
    def empty(cls, dims: int) -> "FeatureStats":
        return cls(
            0, torch.zeros(dims, dtype=torch.float64), torch.zeros(dims, dims, dtype=torch.float64)
        )

    def add(self, features: Tensor) -> None:
        f = features.detach().double().cpu()
        self.count += len(f)
        self.total += f.sum(dim=0)
        self.outer += f.T @ f

    @property
    def mean(self) -> Tensor:
        return self.total / self.count

    @property
    def covariance(self) -> Tensor:
        """The unbiased sample covariance, as numpy.cov and the FID reference code use."""
        mean = self.mean
        return (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)

    def state(self) -> dict:
        return {"count": self.count, "total": self.total, "outer": self.outer}


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)), the last term as the sum of
    square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2) (symmetric, so eigh applies)."""
    cov_a, cov_b = a.covariance, b.covariance
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    middle = root_a @ cov_b @ root_a
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    distance = (a.mean - b.mean).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_root
    return float(distance)


def feature_statistics(
    extractor: nn.Module,
    batches: Callable[[int, int], Tensor],
    total: int,
    what: str,
    partial_file: Path | None = None,
    batch_size: int = 200,
    chunk: int = 1000,
) -> FeatureStats:
    """Statistics of ``extractor`` features of ``total`` images, where ``batches(start, stop)``
    gives images ``start:stop`` as uint8 ``(n, 3, 32, 32)`` on the extractor's device. Every
    ``chunk`` images the statistics so far go to ``partial_file`` (atomically), and a pass
    that finds that file continues after the images it counts (``saved_statistics``)."""
    stats = saved_statistics(partial_file) if partial_file is not None else None
    if stats is not None:
        log.info(f"FID features of {what}: resuming after {stats.count} images ({partial_file})")
    start = stats.count if stats else 0
    progress = PassProgress(f"FID features of {what}", total, start, every=chunk)
    with torch.no_grad():
        while start < total:
            stop = min(start + batch_size, total)
            features = extractor(batches(start, stop))
            if stats is None:
                stats = FeatureStats.empty(features.shape[1])
            stats.add(features)
            if progress.advance_to(stop) and partial_file is not None:
                torch_save_atomically(stats.state(), partial_file)
            start = stop
    return stats


def saved_statistics(path: Path) -> FeatureStats | None:
    """The statistics saved at ``path``, read as weights only; None when there is no such file,
    or (with a warning) when it does not load: damaged or foreign, it is computed anew."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
        return FeatureStats(int(state["count"]), state["total"], state["outer"])
    except Exception as err:
        log.warning(f"FID statistics: {path} does not load ({first_line(err)}): computed anew")
        return None


def cached_statistics(
    cache_dir: Path, key: dict, compute: Callable[[Path], FeatureStats]
) -> FeatureStats:
    """The statistics stored under ``key`` in ``cache_dir`` (``saved_statistics``), else
    ``compute(partial_file)``, stored there; the key is a JSON dict of everything the
    statistics depend on."""
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    final, partial = cache_dir / f"{name}.pt", cache_dir / f"{name}.partial.pt"
    if (stats := saved_statistics(final)) is not None:
        return stats
    stats = compute(partial)
    write_text_atomically(cache_dir / f"{name}.json", json.dumps(key, indent=1, sort_keys=True))
    torch_save_atomically(stats.state(), final)
    partial.unlink(missing_ok=True)
    return stats


def image_slices(images: Tensor, device: torch.device) -> Callable[[int, int], Tensor]:
    return lambda start, stop: images[start:stop].to(device)


def generated_slices(make: Callable[[int, int], Tensor]) -> Callable[[int, int], Tensor]:
    """uint8 images from a function returning floats in [0, 1] for images ``start:stop``."""
    return lambda start, stop: (make(start, stop).clamp(0, 1) * 255).round().to(torch.uint8)


def real_statistics(
    extractor: nn.Module,
    data_dir: str | Path,
    split: str,
    num_images: int | None,
    cache_dir: Path,
    device: torch.device,
    batch_size: int = 200,
) -> FeatureStats:
    """Statistics of the first ``num_images`` (None: all) 8-bit images of CIFAR-10's ``split``
    (train or test, in file order), cached under the files' SHA-256 and the network."""
    train = split == "train"
    folder = Path(data_dir) / BASE_FOLDER
    images = read_cifar10(data_dir, train=train)[0][:num_images]
    key = {
        "network": extractor.name,
        "split": split,
        "num_images": len(images),
        "files": {
            name: file_digest(folder / name) for name in (TRAIN_FILES if train else TEST_FILES)
        },
    }
    slices = image_slices(images, device)
    return cached_statistics(
        cache_dir,
        key,
        lambda partial: feature_statistics(
            extractor, slices, len(images), f"the {split} set", partial, batch_size
        ),
    )

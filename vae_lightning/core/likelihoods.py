"""Decoder likelihoods p(x|z), in the manner of ``torch.distributions``.

A likelihood *head* (a ``LikelihoodHead``, chosen by ``_target_`` in the ``model/likelihood``
config) says how many channels the decoder must output and turns that output into an
``ImageDistribution`` with ``log_prob(x)`` (per image, nats, every constant), ``mean`` (the image
for grids and PSNR) and ``sample()``. Images are on [0, 1], where the 8-bit value k owns the bin
[k/256, (k+1)/256).

- ``GaussianLikelihood``: a density. Its bits/dim is the dequantized bound (``bits_per_dim``
  adds log 256 per dimension).
- ``DiscretizedGaussianLikelihood``: the Gaussian's mass over the value's bin, the outer bins
  open to +-infinity: the probability of the 8-bit image itself, so its bits/dim is a code length.
- ``LogisticMixtureLikelihood``: the discretized logistic mixture of PixelCNN++ (Salimans et al.
  2017), with the RGB channels conditioned linearly on each other; also a probability.

The Gaussian heads have the sigma modes ``fixed``, ``learned`` (one sigma), ``optimal`` (sigma^2
= per-image MSE in the loss, a running mean of it for reporting), ``per_pixel`` (one learned
sigma_i per dimension) and ``heteroscedastic`` (the decoder outputs log sigma_i(z) beside the
mean). Every learned sigma starts at the configured ``sigma``; every sigma has the floor
``SIGMA_MIN``.
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vae_lightning.core.elbo import LOG_2PI, NUM_BINS
from vae_lightning.errors import ConfigError

SigmaMode = Literal["fixed", "learned", "optimal", "per_pixel", "heteroscedastic"]
SIGMA_MODES: tuple[str, ...] = ("fixed", "learned", "optimal", "per_pixel", "heteroscedastic")
SIGMA_MIN = 1e-3
"""Floor on every decoder sigma, so that log sigma stays finite."""
LOG_SIGMA_MIN = math.log(SIGMA_MIN)
LOG_SCALE_MIN = -7.0
"""Floor on the logistic mixture's log-scales (on [-1, 1]), as in PixelCNN++."""
IMAGE_CHANNELS = 3
MASS_CANCELLATION = -1e-3
"""Where log F(lo) - log F(hi) is above this, F(hi) - F(lo) loses its digits to cancellation:
the bin's mass is then the density at its centre times its width (accurate there, since the
density hardly changes over the bin)."""


def _sum_per_image(t: Tensor) -> Tensor:
    return t.flatten(1).sum(dim=1)


def bin_index(x: Tensor) -> Tensor:
    """The 8-bit value k of each entry of ``x`` in [0, 1] (dequantized or at bin centres)."""
    return torch.floor(x * NUM_BINS).clamp(0, NUM_BINS - 1)


def bin_centre(k: Tensor) -> Tensor:
    return (k + 0.5) / NUM_BINS


def log_bin_mass(
    log_cdf: Callable[[Tensor], Tensor],
    log_density: Callable[[Tensor], Tensor],
    k: Tensor,
    centre: Tensor,
    half_width: float,
    loc: Tensor,
    log_scale: Tensor,
) -> Tensor:
    """log P(value k) under a symmetric location-scale family, given as its standardized
    ``log_cdf`` and ``log_density``: the mass over [centre - half_width, centre + half_width],
    the bin of k = 0 open to -infinity and that of k = 255 to +infinity.

    Stable everywhere: a difference of CDFs is taken on the side of the mode where it does not
    cancel (F(-t) = 1 - F(t)), as ``log F(hi) + log(1 - F(lo) / F(hi))``; where it still
    cancels (``MASS_CANCELLATION``), it is the density at the centre times the width. Every
    branch stays finite, so that no NaN gradient leaks through ``torch.where``.
    """
    inv_scale = torch.exp(-log_scale)
    lower = (centre - half_width - loc) * inv_scale
    upper = (centre + half_width - loc) * inv_scale
    log_below_upper = log_cdf(upper)  # the bin of k = 0
    log_above_lower = log_cdf(-lower)  # the bin of k = 255
    flip = lower > 0
    lo = torch.where(flip, -upper, lower)
    log_hi = torch.where(flip, log_above_lower, log_below_upper)  # log F(hi), hi = -lower or upper
    log_ratio = log_cdf(lo) - log_hi
    log_difference = log_hi + torch.log(-torch.expm1(log_ratio.clamp_max(MASS_CANCELLATION)))
    log_centre = log_density((centre - loc) * inv_scale) + math.log(2 * half_width) - log_scale
    log_inner = torch.where(log_ratio > MASS_CANCELLATION, log_centre, log_difference)
    return torch.where(
        k == 0, log_below_upper, torch.where(k == NUM_BINS - 1, log_above_lower, log_inner)
    )


def standard_normal_log_density(t: Tensor) -> Tensor:
    return -0.5 * (t.square() + LOG_2PI)


def standard_logistic_log_density(t: Tensor) -> Tensor:
    """log s(t) = log sigmoid(t) + log sigmoid(-t), written with one logsigmoid."""
    t = t.abs()
    return 2 * F.logsigmoid(t) - t


class ImageDistribution(ABC):
    """p(x|z) for a batch of images, as ``torch.distributions.Distribution`` has it.

    ``discrete``: whether ``log_prob`` is the probability of the 8-bit image (its bits/dim is a
    code length) rather than a density (bits/dim add log 256 per dimension: the dequantized
    bound). ``scale``: the standard deviation per dimension, where there is one to report.
    """

    discrete: bool = False

    @abstractmethod
    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x|z) per image, in nats, every constant included: shape ``(B,)``."""

    @property
    @abstractmethod
    def mean(self) -> Tensor:
        """The image shown for z: reconstructions, samples, PSNR. Shape ``(B, 3, 32, 32)``."""

    @abstractmethod
    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """One draw of x per image, on [0, 1]."""

    @property
    def scale(self) -> Tensor | None:
        """The standard deviation of each dimension (logged as ``sigma``), or None."""
        return None


class LikelihoodHead(nn.Module, ABC):
    """A decoder likelihood: ``out_channels`` decoder output channels in, an
    ``ImageDistribution`` out. ``discrete`` matches the distributions it returns.

    The hooks below have the defaults of a head with no sigma of its own to fit; the Gaussian
    heads override them.
    """

    out_channels: int
    discrete: bool = False

    @abstractmethod
    def forward(self, decoder_output: Tensor) -> ImageDistribution:
        """p(x|z) for the decoder's output, of shape ``(B, out_channels, 32, 32)``."""

    def loss_distribution(self, p_x: ImageDistribution, x: Tensor) -> ImageDistribution:
        """The p(x|z) that the training loss scores images ``x`` with: ``p_x`` itself, unless
        the head fits it to ``x`` (the Gaussian's ``optimal`` sigma)."""
        return p_x

    def scalar_log_sigma(self) -> Tensor | None:
        """The one log sigma of every pixel and image of a Gaussian, if there is one (the grid
        estimator then needs only squared errors)."""
        return None

    def update_running_sigma(
        self, mse_sum: Tensor, images: Tensor, accept: Tensor | None = None
    ) -> None:
        """Follow the training batches' mean squared error (``mse_sum``, the per-pixel MSEs
        summed over the batch's ``images``), for a head whose sigma does."""


class Gaussian(ImageDistribution):
    """p(x|z) = prod_i N(x_i | loc_i, sigma_i^2): a density on the real line per dimension."""

    def __init__(self, loc: Tensor, log_scale: Tensor) -> None:
        self.loc = loc
        self.log_scale = log_scale.expand_as(loc)

    @property
    def mean(self) -> Tensor:
        return self.loc

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp()

    def log_prob(self, x: Tensor) -> Tensor:
        z = (x - self.loc) * torch.exp(-self.log_scale)
        return _sum_per_image(-0.5 * z.square() - self.log_scale - 0.5 * LOG_2PI)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        eps = torch.randn(
            self.loc.shape, generator=generator, device=self.loc.device, dtype=self.loc.dtype
        )
        return self.loc + self.scale * eps


class DiscretizedGaussian(Gaussian):
    """The Gaussian's mass over each 8-bit value's bin: a probability of the 8-bit image."""

    discrete = True

    def log_prob(self, x: Tensor) -> Tensor:
        k = bin_index(x)
        return _sum_per_image(
            log_bin_mass(
                torch.special.log_ndtr,
                standard_normal_log_density,
                k,
                bin_centre(k),
                0.5 / NUM_BINS,
                self.loc,
                self.log_scale,
            )
        )

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        return bin_centre(bin_index(super().sample(generator)))


class GaussianLikelihood(LikelihoodHead):
    """A Gaussian decoder likelihood, a density, with one of ``SIGMA_MODES``.

    The decoder's output, through ``mean_transform`` (a sigmoid: means in (0, 1)), is the mean;
    in ``heteroscedastic`` mode only its first half is, and its second half is log sigma_i(z),
    offset so that an output of 0 is the configured ``sigma``.
    """

    distribution: type[Gaussian] = Gaussian

    def __init__(
        self,
        sigma: float = 0.1,
        sigma_mode: SigmaMode = "fixed",
        sigma_momentum: float = 0.01,
        mean_transform: Callable[[Tensor], Tensor] = torch.sigmoid,
    ) -> None:
        super().__init__()
        if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not sigma > 0:
            raise ConfigError(f"sigma={sigma!r} is not allowed: sigma must be a number > 0.")
        if sigma_mode not in SIGMA_MODES:
            raise ConfigError(
                f"sigma_mode={sigma_mode!r} is not allowed: sigma_mode must be one of "
                f"{', '.join(SIGMA_MODES)}."
            )
        self.sigma_mode = sigma_mode
        self.sigma_momentum = sigma_momentum
        self.mean_transform = mean_transform
        self.out_channels = (
            2 * IMAGE_CHANNELS if sigma_mode == "heteroscedastic" else IMAGE_CHANNELS
        )
        log_sigma = torch.tensor(math.log(sigma))
        if sigma_mode == "learned":
            self.log_sigma = nn.Parameter(log_sigma)
        elif sigma_mode == "per_pixel":
            self.log_sigma = nn.Parameter(log_sigma.expand(IMAGE_CHANNELS, 32, 32).clone())
        else:  # heteroscedastic: the offset of the decoder's log sigma output
            self.register_buffer("log_sigma", log_sigma)

    def forward(self, decoder_output: Tensor) -> Gaussian:
        """p(x|z) for the decoder's output; sigma is the model's (data-independent in every
        mode but ``heteroscedastic``)."""
        log_sigma = self.log_sigma
        if self.sigma_mode == "heteroscedastic":
            decoder_output, log_sigma_output = decoder_output.chunk(2, dim=1)
            log_sigma = log_sigma_output + log_sigma
        loc = self.mean_transform(decoder_output)
        return self.distribution(loc, log_sigma.clamp_min(LOG_SIGMA_MIN))

    def loss_distribution(self, p_x: Gaussian, x: Tensor) -> Gaussian:
        """In ``optimal`` mode, p(x|z) with sigma^2 = each image's MSE: the calibrated decoder."""
        if self.sigma_mode != "optimal":
            return p_x
        mse = (x - p_x.loc).square().flatten(1).mean(dim=1)
        log_sigma = 0.5 * torch.log(mse.clamp_min(SIGMA_MIN**2))
        return self.distribution(p_x.loc, log_sigma.view(-1, *[1] * (p_x.loc.dim() - 1)))

    def scalar_log_sigma(self) -> Tensor | None:
        if self.sigma_mode in ("per_pixel", "heteroscedastic"):
            return None
        return self.log_sigma.clamp_min(LOG_SIGMA_MIN)

    @torch.no_grad()
    def update_running_sigma(
        self, mse_sum: Tensor, images: Tensor, accept: Tensor | None = None
    ) -> None:
        """In ``optimal`` mode, move sigma^2 towards the batch's mean per-pixel squared error,
        ``mse_sum / images`` (under DDP, the global batch's, so that every rank keeps the same
        sigma); with ``accept``, a boolean tensor, only where it is true (decided on the
        device). Other modes launch nothing."""
        if self.sigma_mode != "optimal":
            return
        variance = torch.exp(2.0 * self.log_sigma)
        variance = variance + self.sigma_momentum * (mse_sum / images - variance)
        updated = 0.5 * torch.log(variance)
        if accept is not None:
            updated = torch.where(accept, updated, self.log_sigma)
        self.log_sigma.copy_(updated)


class DiscretizedGaussianLikelihood(GaussianLikelihood):
    """The Gaussian head scoring each 8-bit value by its bin's mass: a code length."""

    distribution = DiscretizedGaussian
    discrete = True


class DiscretizedLogisticMixture(ImageDistribution):
    """PixelCNN++'s likelihood per pixel: a mixture of M logistics over RGB, where the means of
    G and B depend linearly on the values of R (and G), on the [-1, 1] scale of that paper."""

    discrete = True

    def __init__(self, decoder_output: Tensor, num_mixtures: int) -> None:
        b, _, h, w = decoder_output.shape
        m = num_mixtures
        self.logits = decoder_output[:, :m]
        params = decoder_output[:, m:].reshape(b, 3, IMAGE_CHANNELS, m, h, w)
        self.means = params[:, 0]
        self.log_scales = params[:, 1].clamp_min(LOG_SCALE_MIN)
        self.coeffs = torch.tanh(params[:, 2])  # (r->g, r->b, g->b) per component

    def _channel_means(self, values: Tensor) -> Tensor:
        """Each component's means of R, G, B given the pixel's (R, G) ``values`` ((B, 3, H, W)
        on [-1, 1])."""
        r, g = values[:, 0:1], values[:, 1:2]
        c = self.coeffs
        return torch.stack(
            [
                self.means[:, 0],
                self.means[:, 1] + c[:, 0] * r,
                self.means[:, 2] + c[:, 1] * r + c[:, 2] * g,
            ],
            dim=1,
        )

    def log_prob(self, x: Tensor) -> Tensor:
        k = bin_index(x)
        centre = 2 * bin_centre(k) - 1  # on [-1, 1]: bins of width 2/256
        centre_m, k_m = centre.unsqueeze(2), k.unsqueeze(2)
        log_mass = log_bin_mass(
            F.logsigmoid,
            standard_logistic_log_density,
            k_m,
            centre_m,
            1.0 / NUM_BINS,
            self._channel_means(centre),
            self.log_scales,
        )
        log_weights = torch.log_softmax(self.logits, dim=1)
        return _sum_per_image(torch.logsumexp(log_mass.sum(dim=1) + log_weights, dim=1))

    @property
    def mean(self) -> Tensor:
        """The mixture's mean before discretization, clamped to [0, 1]: within a component,
        E[G] = mu_G + c_RG E[R] and E[B] = mu_B + c_RB E[R] + c_GB E[G]."""
        mu, c = self.means, self.coeffs
        r = mu[:, 0]
        g = mu[:, 1] + c[:, 0] * r
        b = mu[:, 2] + c[:, 1] * r + c[:, 2] * g
        weights = torch.softmax(self.logits, dim=1)
        value = (torch.stack([r, g, b], dim=1) * weights.unsqueeze(1)).sum(dim=2)
        return ((value + 1) / 2).clamp(0, 1)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """A component per pixel, then R, G given R, B given R and G, each on its bin centre."""
        weights = torch.softmax(self.logits, dim=1).movedim(1, -1)
        flat = weights.reshape(-1, weights.shape[-1])
        component = torch.multinomial(flat, 1, generator=generator).view(*weights.shape[:-1])
        pick = component.unsqueeze(1).unsqueeze(2)  # (B, 1, 1, H, W)

        def chosen(t: Tensor) -> Tensor:
            index = pick.expand(t.shape[0], t.shape[1], 1, *t.shape[3:])
            return t.gather(2, index).squeeze(2)

        mu, log_s, c = chosen(self.means), chosen(self.log_scales), chosen(self.coeffs)
        u = torch.rand(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        noise = torch.exp(log_s) * (
            torch.log(u.clamp_min(1e-7)) - torch.log1p(-u.clamp_max(1 - 1e-7))
        )

        def quantize(t: Tensor) -> Tensor:
            return 2 * bin_centre(bin_index((t + 1) / 2)) - 1

        r = quantize(mu[:, 0] + noise[:, 0])
        g = quantize(mu[:, 1] + c[:, 0] * r + noise[:, 1])
        b = quantize(mu[:, 2] + c[:, 1] * r + c[:, 2] * g + noise[:, 2])
        return (torch.stack([r, g, b], dim=1) + 1) / 2


class LogisticMixtureLikelihood(LikelihoodHead):
    """The discretized logistic mixture head: ``num_mixtures`` x (1 weight + 3 means + 3
    log-scales + 3 channel coefficients) output channels per pixel."""

    discrete = True

    def __init__(self, num_mixtures: int = 10) -> None:
        super().__init__()
        if isinstance(num_mixtures, bool) or not isinstance(num_mixtures, int) or num_mixtures < 1:
            raise ConfigError(
                f"num_mixtures={num_mixtures!r} is not allowed: num_mixtures must be an "
                "integer >= 1."
            )
        self.num_mixtures = num_mixtures
        self.out_channels = 10 * num_mixtures

    def forward(self, decoder_output: Tensor) -> DiscretizedLogisticMixture:
        return DiscretizedLogisticMixture(decoder_output, self.num_mixtures)

"""Where generated images' latents come from: the prior, or a density fitted after training to
where the training set's posteriors lie (ex-post density estimation).

A VAE's prior and its aggregate posterior q(z) = E_x q(z|x) differ: prior draws that land where
q(z) has no mass decode to texture without objects. Ghosh et al. (2020) fit a Gaussian mixture
to the training set's posterior means; Dai & Wipf (2019) train a second, small VAE on posterior
samples, whose prior draws its decoder maps to where the first VAE's latents are. Each sampler
is an ``nn.Module`` whose state dict (tensors only) is the fitted density.
"""

import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from vae_lightning.core.architectures import check_widths, mlp
from vae_lightning.core.likelihoods import GaussianLikelihood
from vae_lightning.core.vae import VAE
from vae_lightning.errors import ConfigError, first_line
from vae_lightning.files import torch_save_atomically

log = logging.getLogger(__name__)


class LatentSampler(nn.Module, ABC):
    """Draws latents ``(n, H)`` for the decoder. ``fit`` sees the training set's posterior
    means and log-variances once, after training; a sampler that needs no data ignores it."""

    needs_fit: bool = True

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim

    def fit(self, mu: Tensor, logvar: Tensor, generator: torch.Generator) -> None:
        """Fit the density to the posteriors q(z|x_i) = N(mu_i, diag exp(logvar_i))."""

    @abstractmethod
    def sample(self, num_samples: int, generator: torch.Generator) -> Tensor:
        """``num_samples`` latents, on the sampler's device."""


def _require_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} is not allowed: {name} must be an integer >= 1.")


class PriorSampler(LatentSampler):
    """z ~ N(0, T^2 I): the prior, at ``temperature`` T (T < 1 trades diversity for draws
    nearer the origin, where the posteriors are densest)."""

    needs_fit = False

    def __init__(self, latent_dim: int, temperature: float = 1.0) -> None:
        super().__init__(latent_dim)
        number = isinstance(temperature, int | float) and not isinstance(temperature, bool)
        if not (number and temperature > 0):
            raise ConfigError(
                f"temperature={temperature!r} is not allowed: temperature must be a number > 0."
            )
        self.temperature = float(temperature)

    def sample(self, num_samples: int, generator: torch.Generator) -> Tensor:
        z = torch.randn(num_samples, self.latent_dim, generator=generator, device=generator.device)
        return self.temperature * z


class GaussianMixtureSampler(LatentSampler):
    """A Gaussian mixture with ``components`` full-covariance components fitted by
    scikit-learn's EM to the training set's posterior means (Ghosh et al. 2020)."""

    def __init__(
        self, latent_dim: int, components: int = 10, max_iter: int = 200, seed: int = 0
    ) -> None:
        super().__init__(latent_dim)
        _require_count("components", components)
        _require_count("max_iter", max_iter)
        self.components, self.max_iter, self.seed = components, max_iter, seed
        self.register_buffer("weights", torch.full((components,), 1.0 / components))
        self.register_buffer("means", torch.zeros(components, latent_dim))
        self.register_buffer("scale_tril", torch.eye(latent_dim).repeat(components, 1, 1))

    def fit(self, mu: Tensor, logvar: Tensor, generator: torch.Generator) -> None:
        from sklearn.mixture import GaussianMixture

        if len(mu) < self.components:
            raise ConfigError(
                f"components={self.components} is not allowed here: the mixture is fitted to "
                f"{len(mu)} latents, and components must be at most that."
            )
        mixture = GaussianMixture(
            self.components, covariance_type="full", max_iter=self.max_iter, random_state=self.seed
        ).fit(mu.double().cpu().numpy())
        device = self.means.device
        self.weights = torch.from_numpy(mixture.weights_).float().to(device)
        self.means = torch.from_numpy(mixture.means_).float().to(device)
        covariances = torch.from_numpy(mixture.covariances_)
        self.scale_tril = torch.linalg.cholesky(covariances).float().to(device)

    def distribution(self) -> MixtureSameFamily:
        """The fitted mixture, in float64 (a log-density to compare, not to train)."""
        return MixtureSameFamily(
            Categorical(probs=self.weights.double()),
            MultivariateNormal(self.means.double(), scale_tril=self.scale_tril.double()),
        )

    def log_prob(self, z: Tensor) -> Tensor:
        return self.distribution().log_prob(z.double())

    def sample(self, num_samples: int, generator: torch.Generator) -> Tensor:
        component = torch.multinomial(self.weights, num_samples, True, generator=generator)
        eps = torch.randn(
            num_samples, self.latent_dim, 1, generator=generator, device=self.means.device
        )
        return self.means[component] + (self.scale_tril[component] @ eps).squeeze(-1)


class TwoStageSampler(LatentSampler):
    """The two-stage VAE (Dai & Wipf 2019): a second VAE, with MLPs of ``hidden_dims`` and a
    learned Gaussian sigma, trained on one posterior sample per training image. Its loss is
    ``VAE.elbo_terms``, the first stage's. The latents are draws of its density,
    z = f(u) + sigma * eps for u, eps ~ N(0, I), or with ``decoder_noise=False`` its decoder
    means f(u) alone, as Dai & Wipf: the same where sigma goes to 0, but where the latents are
    nearly Gaussian already (a first stage with a fixed sigma), the second stage keeps sigma
    large and f(u) alone shrinks the latents towards their mean."""

    def __init__(
        self,
        latent_dim: int,
        second_latent_dim: int | None = None,
        hidden_dims: Sequence[int] = (512, 512),
        epochs: int = 50,
        batch_size: int = 250,
        lr: float = 1e-3,
        decoder_noise: bool = True,
    ) -> None:
        super().__init__(latent_dim)
        check_widths("hidden_dims", hidden_dims)
        if not isinstance(decoder_noise, bool):
            raise ConfigError(
                f"decoder_noise={decoder_noise!r} is not allowed: decoder_noise must be true or "
                "false."
            )
        _require_count("epochs", epochs)
        _require_count("batch_size", batch_size)
        if second_latent_dim is not None:
            _require_count("second_latent_dim", second_latent_dim)
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0:
            raise ConfigError(f"lr={lr!r} is not allowed: lr must be a number > 0.")
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.decoder_noise = decoder_noise
        inner = second_latent_dim or latent_dim
        hidden = list(hidden_dims)
        self.vae = VAE(
            encoder=mlp([latent_dim, *hidden, 2 * inner]),
            decoder=mlp([inner, *hidden[::-1], latent_dim]),
            latent_dim=inner,
            likelihood=GaussianLikelihood(1.0, "learned", mean_transform=nn.Identity()),
        )

    def fit(self, mu: Tensor, logvar: Tensor, generator: torch.Generator) -> None:
        device = next(self.parameters()).device
        noise = torch.randn(mu.shape, generator=generator, device=generator.device)
        z = (mu + torch.exp(0.5 * logvar) * noise.to(mu)).float().to(device)
        optimizer = torch.optim.Adam(self.vae.parameters(), lr=self.lr)
        self.vae.train()
        with torch.enable_grad():
            for _ in range(self.epochs):
                order = torch.randperm(len(z), generator=generator, device=generator.device)
                for batch in order.to(device).split(self.batch_size):
                    loss = self.vae.elbo_terms(z[batch]).loss.mean()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        self.vae.eval()

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator) -> Tensor:
        p_z = self.vae.observation_model(self.vae.prior_draws(num_samples, generator))
        return p_z.sample(generator) if self.decoder_noise else p_z.mean


def load_or_fit(
    sampler: LatentSampler,
    path: Path,
    key: dict[str, Any],
    posteriors: Callable[[], tuple[Tensor, Tensor]],
    generator: torch.Generator,
) -> LatentSampler:
    """``sampler`` with the state saved at ``path`` when that file was saved under the same
    ``key`` (its settings, the checkpoint), else fitted to ``posteriors()`` (mu, logvar) and
    saved there (atomically, tensors only). A sampler that needs no fit is returned as is."""
    if not sampler.needs_fit:
        return sampler
    key_text = json.dumps(key, sort_keys=True)
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved["key"] == key_text:
                sampler.load_state_dict(saved["state"])
                log.info(f"Sampler {path.stem}: fitted before, read from {path}")
                return sampler
        except Exception as err:  # damaged or foreign: fitted again, and overwritten
            log.warning(f"Sampler {path.stem}: {path} does not load ({first_line(err)}): refitting")
    started = time.perf_counter()
    mu, logvar = posteriors()
    sampler.fit(mu, logvar, generator)
    seconds = time.perf_counter() - started
    torch_save_atomically({"key": key_text, "state": sampler.state_dict()}, path)
    log.info(f"Sampler {path.stem}: fitted to {len(mu)} posteriors in {seconds:.0f} s ({path})")
    return sampler

"""How good a trained VAE is on a set of 8-bit images: likelihood estimates, reconstructions,
latent usage, FID, and image grids."""

import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchvision.utils import make_grid

from vae_lightning.core.elbo import kl_per_dimension, squared_error, to_unit_interval
from vae_lightning.core.estimators import grid_log_likelihood, sampled_estimates
from vae_lightning.core.posterior import active_units
from vae_lightning.core.vae import VAE
from vae_lightning.evaluation.fid import (
    FeatureStats,
    cached_statistics,
    feature_statistics,
    frechet_distance,
    generated_slices,
    real_statistics,
)
from vae_lightning.evaluation.pass_progress import PassProgress
from vae_lightning.evaluation.samplers import LatentSampler
from vae_lightning.files import save_png_atomically
from vae_lightning.training.callbacks import GRID_COLUMNS, side_by_side

log = logging.getLogger(__name__)


def batches(images: Tensor, batch_size: int, device, dequantize: bool) -> Iterator[Tensor]:
    """uint8 images -> scaled float batches on ``device``."""
    for chunk in images.split(batch_size):
        yield to_unit_interval(chunk.to(device), dequantize)


@torch.no_grad()
def likelihood_metrics(
    vae: VAE,
    images: Tensor,
    batch_size: int,
    num_samples: int,
    max_batch: int,
    dequantize: bool,
    grid_points: int,
    grid_limit: float,
    active_threshold: float,
    prior_sampling: bool = True,
) -> dict[str, float | str | list[float]]:
    """ELBO, IWAE, (``prior_sampling``) prior-sampling and (H <= 2) grid estimates of log p(x),
    in nats per image and bits/dim; reconstruction MSE/PSNR/SSIM at z = mu; active units and
    KL per latent dim."""
    device = next(vae.parameters()).device
    num_dims = images[0].numel()
    with_grid = vae.latent_dim <= 2
    psnr = PeakSignalNoiseRatio(data_range=1.0).to(device)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0).to(device)
    sums: dict[str, Tensor] = {}
    mus, scored = [], []
    kl_per_dim = torch.zeros(vae.latent_dim, device=device, dtype=torch.float64)

    def add(name: str, per_image: Tensor) -> None:
        sums[name] = sums.get(name, 0.0) + per_image.double().sum()

    progress = PassProgress(f"Likelihood estimates (K = {num_samples})", len(images))
    for x in batches(images, batch_size, device, dequantize):
        estimates = sampled_estimates(vae, x, num_samples, max_batch, prior_sampling=prior_sampling)
        add("elbo", estimates.elbo)
        add("iwae", estimates.iwae)
        if estimates.prior is not None:
            add("prior_sampling", estimates.prior)
        if with_grid:
            scored.append(x)
        mu, logvar = vae.encode(x)
        recon = vae.decode(mu)
        add("recon_mse", squared_error(x, recon) / num_dims)
        psnr.update(recon, x)
        ssim.update(recon, x)
        mus.append(mu.double())
        kl_per_dim += kl_per_dimension(mu, logvar).double().sum(0)
        progress.advance_to(progress.done + len(x))

    if with_grid:  # one pass over the grid for all images: m^H decoder calls in all
        grid = grid_log_likelihood(vae, torch.cat(scored), grid_points, grid_limit, max_batch)
        add("grid", grid.log_px)
    n = len(images)
    means = {name: (total / n).item() for name, total in sums.items()}
    results: dict[str, float | str | list[float]] = {"num_images": n, "num_samples": num_samples}
    results["bpd_kind"] = vae.bpd_kind
    for name in ("elbo", "iwae", "prior_sampling", "grid"):
        if name in means:
            results[f"{name}_nats"] = means[name]
            results[f"{name}_bpd"] = vae.bits_per_dim(torch.tensor(means[name]), num_dims).item()
    if with_grid:
        grid_edge_share = grid.edge_share.max().item()
        results["grid_edge_share_max"] = grid_edge_share
        if grid_edge_share > 1e-3:
            log.warning(
                "The latent grid's outermost cells hold up to %.2g of p(x) for some image: it "
                "cuts off mass. Raise eval.grid_limit (and eval.grid_points with it).",
                grid_edge_share,
            )
    results["iwae_minus_elbo_nats"] = means["iwae"] - means["elbo"]
    results["iwae_minus_elbo_bpd"] = results["elbo_bpd"] - results["iwae_bpd"]
    results["recon_mse"] = means["recon_mse"]
    results["psnr"] = psnr.compute().item()
    results["ssim"] = ssim.compute().item()
    mu_var = torch.cat(mus).var(dim=0)
    results["active_units"] = active_units(mu_var, active_threshold)
    results["latent_dim"] = vae.latent_dim
    results["mu_variance_per_dim"] = mu_var.tolist()
    results["kl_per_dim"] = (kl_per_dim / n).tolist()
    results["kl"] = (kl_per_dim.sum() / n).item()
    return results


@torch.no_grad()
def fid_scores(
    extractor: nn.Module,
    vae: VAE,
    images: Tensor,
    samplers: Mapping[str, LatentSampler],
    settings: Mapping[str, Any],
    data_dir: str,
    cache_dir: Path,
    checkpoint_digest: str,
    seed: int,
    batch_size: int,
) -> dict[str, float | int | list[str]]:
    """FID of N = ``len(images)`` generated images per sampler (decoder means of its latents)
    and of the reconstructions of ``images`` (the first N test images, at z = mu), each against
    two references: all training images (``fid_<set>``, the field's protocol) and the N test
    images (``fid_<set>_test``). The floors are what N real images score: the test images
    against the training images (``fid_floor``), the first N training images against the test
    images (``fid_floor_test``). Real statistics are cached per data files and count, generated
    ones per checkpoint, set, its ``settings``, seed and N, so a repeated or interrupted
    evaluation resumes. A sampler's N latents are one draw from a generator seeded with
    ``seed``, so its images do not depend on ``batch_size`` (images per network call).
    ``fid_sets`` lists the sets, in order."""
    device = next(vae.parameters()).device
    extractor = extractor.to(device)
    n = len(images)

    def real(split: str, count: int | None) -> FeatureStats:
        return real_statistics(extractor, data_dir, split, count, cache_dir, device, batch_size)

    train, test = real("train", None), real("test", n)
    scores = {
        "fid_floor": frechet_distance(test, train),
        "fid_floor_test": frechet_distance(real("train", n), test),
    }

    def drawn(sampler: LatentSampler) -> Callable[[int, int], Tensor]:
        latents = sampler.sample(n, torch.Generator(device).manual_seed(seed))
        return lambda start, stop: vae.decode(latents[start:stop])

    def reconstructions(start: int, stop: int) -> Tensor:
        x = to_unit_interval(images[start:stop].to(device), dequantize=False)
        return vae.decode(vae.encode(x)[0])

    sets = {name: (drawn(sampler), settings[name]) for name, sampler in samplers.items()}
    sets["reconstructions"] = (reconstructions, {})
    for name, (make, set_settings) in sets.items():
        key = {
            "network": extractor.name,
            "checkpoint": checkpoint_digest,
            "set": name,
            "settings": set_settings,
            "n": n,
            "seed": seed,
            "latents": "one draw of N",
        }

        def compute(partial: Path, make=make, name=name) -> FeatureStats:
            return feature_statistics(
                extractor, generated_slices(make), n, name.replace("_", " "), partial, batch_size
            )

        stats = cached_statistics(cache_dir, key, compute)
        scores[f"fid_{name}"] = frechet_distance(stats, train)
        scores[f"fid_{name}_test"] = frechet_distance(stats, test)
    scores["fid_sets"] = list(sets)
    scores["fid_num_images"] = n
    scores["fid_reference_images"] = train.count
    return scores


@torch.no_grad()
def save_grids(
    vae: VAE,
    images: Tensor,
    output_dir: Path,
    mu_variance: Tensor,
    samplers: Mapping[str, LatentSampler] | None = None,
    num_images: int = 16,
) -> list[Path]:
    """PNG grids: reconstructions beside originals, prior samples, interpolations between test
    images in latent space, traversals of the most active latent dimensions, and
    ``samples_<name>`` for each of ``samplers`` fitted to the posteriors."""
    device = next(vae.parameters()).device
    x = to_unit_interval(images[:num_images].to(device), dequantize=False)
    mu = vae.encode(x)[0]
    # 10 steps from image 2i to image 2i+1, in latent space
    start, end = mu[0::2], mu[1::2]
    steps = torch.linspace(0, 1, 10, device=device, dtype=mu.dtype)[None, :, None]
    interpolation = start[:, None] + steps * (end - start)[:, None]
    # the first image's code with one of the most active dims set to -3 ... 3, per row
    top = mu_variance.argsort(descending=True)[: min(8, vae.latent_dim)].to(device)
    traversal = mu[0].repeat(len(top), 10, 1)
    traversal[torch.arange(len(top)), :, top] = torch.linspace(-3, 3, 10, device=device).to(mu)
    grids = {
        "reconstructions": (side_by_side(x, vae.decode(mu)), GRID_COLUMNS),
        "samples": (vae.sample(64), GRID_COLUMNS),
        "interpolations": (vae.decode(interpolation.flatten(0, 1)), 10),
        "traversals": (vae.decode(traversal.flatten(0, 1)), 10),
    }
    generator = torch.Generator(device).manual_seed(0)
    for name, sampler in (samplers or {}).items():
        if sampler.needs_fit:
            grids[f"samples_{name}"] = (vae.decode(sampler.sample(64, generator)), GRID_COLUMNS)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (grid_images, per_row) in grids.items():
        path = output_dir / f"{name}.png"
        save_png_atomically(make_grid(grid_images.clamp(0, 1).float().cpu(), nrow=per_row), path)
        paths.append(path)
    return paths


@torch.no_grad()
def posterior_parameters(vae: VAE, images: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """The posterior means and log-variances ``(N, H)`` of 8-bit ``images``, on the CPU."""
    device = next(vae.parameters()).device
    params = [vae.encode(x) for x in batches(images, batch_size, device, dequantize=False)]
    return tuple(torch.cat([p[i].float().cpu() for p in params]) for i in (0, 1))

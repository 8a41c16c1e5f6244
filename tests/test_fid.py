"""FID: the Fréchet distance, the streaming statistics, the TF resize, caching and resuming."""

import hashlib
import importlib.util
import json
import logging
import math
import shutil

import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import LeavesMarker, run_module, write_cifar10
from vae_lightning.core.architectures import MLPDecoder, MLPEncoder
from vae_lightning.core.vae import VAE
from vae_lightning.data.cifar10 import read_cifar10
from vae_lightning.evaluation import pass_progress
from vae_lightning.evaluation.feature_networks import (
    FIDNetworkError,
    FIDUnavailableError,
    TFInception,
    build_extractor,
    load_torchscript,
    tf_inception_file,
)
from vae_lightning.evaluation.fid import (
    FeatureStats,
    cached_statistics,
    feature_statistics,
    frechet_distance,
    generated_slices,
    image_slices,
    real_statistics,
    tf_bilinear_resize,
)
from vae_lightning.evaluation.metrics import fid_scores
from vae_lightning.evaluation.samplers import PriorSampler
from vae_lightning.fid import OPTIONS


def stats_of(features: torch.Tensor) -> FeatureStats:
    stats = FeatureStats.empty(features.shape[1])
    stats.add(features)
    return stats


def test_streaming_statistics_equal_the_mean_and_covariance_of_all_features():
    features = torch.randn(500, 7, dtype=torch.float64) @ torch.randn(7, 7, dtype=torch.float64)
    stats = FeatureStats.empty(7)
    for part in features.split(64):
        stats.add(part)
    torch.testing.assert_close(stats.mean, features.mean(0))
    torch.testing.assert_close(stats.covariance, torch.cov(features.T))


def test_frechet_distance_equals_scipys_sqrtm_formula_and_the_1d_closed_form():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=gen, dtype=torch.float64)
    b = (
        0.5
        * torch.randn(300, 6, generator=gen, dtype=torch.float64)
        @ torch.randn(6, 6, generator=gen, dtype=torch.float64)
        + 1.0
    )
    sa, sb = stats_of(a), stats_of(b)
    cov_a, cov_b = sa.covariance.numpy(), sb.covariance.numpy()
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    expected = ((sa.mean - sb.mean) ** 2).sum().item() + (cov_a + cov_b - 2 * root).trace()
    assert frechet_distance(sa, sb) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(sa, sa) == pytest.approx(0.0, abs=1e-9)
    # one dimension: (mu_a - mu_b)^2 + (s_a - s_b)^2
    x, y = a[:, :1], 3.0 * a[:, 1:2] - 2.0
    sx, sy = stats_of(x), stats_of(y)
    closed = (sx.mean - sy.mean).item() ** 2 + (
        math.sqrt(sx.covariance.item()) - math.sqrt(sy.covariance.item())
    ) ** 2
    assert frechet_distance(sx, sy) == pytest.approx(closed, rel=1e-9)


def test_tf_resize_samples_the_input_at_j_times_in_over_out():
    """The same resize written as TensorFlow-style sampling with grid_sample (an affine grid
    shifted by 1/in - 1/out), and two properties of it."""
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    theta = torch.eye(2, 3, dtype=torch.float64)
    theta[:, 2] += 1 / 32 - 1 / 299
    grid = F.affine_grid(theta.expand(2, 2, 3), [2, 3, 299, 299], align_corners=False)
    reference = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    resized = tf_bilinear_resize(x)
    torch.testing.assert_close(resized, reference)
    torch.testing.assert_close(resized[..., 0, 0], x[..., 0, 0])  # output 0 samples input 0
    tall = torch.rand(3, 5, 9, dtype=torch.float64)  # (C, H, W), not square
    expected = torch.empty(3, 7, 7, dtype=torch.float64)
    for i in range(7):
        for j in range(7):
            y, x_ = i * 5 / 7, j * 9 / 7
            y0, x0 = math.floor(y), math.floor(x_)
            y1, x1 = min(y0 + 1, 4), min(x0 + 1, 8)
            top = tall[:, y0, x0] * (1 - (x_ - x0)) + tall[:, y0, x1] * (x_ - x0)
            bottom = tall[:, y1, x0] * (1 - (x_ - x0)) + tall[:, y1, x1] * (x_ - x0)
            expected[:, i, j] = top * (1 - (y - y0)) + bottom * (y - y0)
    torch.testing.assert_close(tf_bilinear_resize(tall, 7), expected)
    flat = torch.full((1, 3, 32, 32), 7.0, dtype=torch.float64)
    torch.testing.assert_close(tf_bilinear_resize(flat), torch.full((1, 3, 299, 299), 7.0).double())


class CountingExtractor(nn.Module):
    """Mean colour and spread per channel; raises after ``fail_after`` calls, if set."""

    name = "counting"

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.calls = 0
        self.images = 0
        self.fail_after = fail_after

    def forward(self, images):
        if self.fail_after is not None and self.calls == self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.images += len(images)
        x = images.float().flatten(2)
        return torch.cat([x.mean(2), x.std(2)], dim=1)


def test_an_interrupted_pass_resumes_after_its_last_saved_chunk(tmp_path):
    images = torch.randint(0, 256, (950, 3, 32, 32), dtype=torch.uint8)
    slices = image_slices(images, torch.device("cpu"))
    partial = tmp_path / "pass.partial.pt"
    with pytest.raises(KeyboardInterrupt):  # stopped in the batch of images 700:800
        feature_statistics(CountingExtractor(7), slices, 950, "x", partial, 100, chunk=300)
    assert torch.load(partial, weights_only=True)["count"] == 600
    resumed_extractor = CountingExtractor()
    resumed = feature_statistics(resumed_extractor, slices, 950, "x", partial, 100, chunk=300)
    assert resumed_extractor.images == 350  # only what the saved statistics did not count
    whole = feature_statistics(CountingExtractor(), slices, 950, "x", None, 100)
    assert resumed.count == whole.count == 950
    torch.testing.assert_close(resumed.total, whole.total)
    torch.testing.assert_close(resumed.outer, whole.outer)


def test_a_resumed_pass_reports_the_rate_of_the_images_it_computed(
    tmp_path, monkeypatch, capsys, caplog
):
    images = torch.randint(0, 256, (950, 3, 32, 32), dtype=torch.uint8)
    slices = image_slices(images, torch.device("cpu"))
    partial = tmp_path / "pass.partial.pt"
    with pytest.raises(KeyboardInterrupt):
        feature_statistics(CountingExtractor(7), slices, 950, "x", partial, 100, chunk=300)
    capsys.readouterr()
    clock = iter(range(100))  # one second per reading: 3 batches of 100 by the first line
    monkeypatch.setattr(pass_progress.time, "perf_counter", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="vae_lightning.evaluation.fid"):
        feature_statistics(CountingExtractor(), slices, 950, "x", partial, 100, chunk=300)
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("FID features of x: 900/950 images, 100.0 images/s")  # not 300/s
    assert f"FID features of x: resuming after 600 images ({partial})" in caplog.text


def test_a_damaged_or_crafted_partial_pass_file_is_computed_anew_and_runs_no_code(tmp_path, caplog):
    images = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8)
    slices = image_slices(images, torch.device("cpu"))
    marker = tmp_path / "marker"
    partial = tmp_path / "pass.partial.pt"
    torch.save({"count": 10, "total": LeavesMarker(marker)}, partial)
    with caplog.at_level(logging.WARNING):
        stats = feature_statistics(CountingExtractor(), slices, 30, "x", partial, 10, chunk=10)
    assert not marker.exists() and "does not load (Weights only load failed" in caplog.text
    whole = feature_statistics(CountingExtractor(), slices, 30, "x", None, 10)
    assert stats.count == 30
    torch.testing.assert_close(stats.outer, whole.outer)
    key = {"n": 30}  # a crafted file in the cache: computed anew, no code run
    name = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]
    torch.save({"count": 30, "total": LeavesMarker(marker)}, tmp_path / f"{name}.pt")
    counting = CountingExtractor()
    cached = cached_statistics(
        tmp_path, key, lambda partial: feature_statistics(counting, slices, 30, "x", partial, 10)
    )
    assert not marker.exists() and counting.images == 30 and cached.count == 30


def test_statistics_of_features_far_from_zero_keep_their_covariance():
    """Sums of outer products in float64: features near 1e4 with unit spread keep their
    covariance (in float32 the sums would lose it to rounding)."""
    features = 1e4 + torch.randn(
        2000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    stats = FeatureStats.empty(3)
    for chunk in features.float().split(100):
        stats.add(chunk)
    torch.testing.assert_close(stats.covariance, torch.cov(features.float().double().T))


def test_generated_images_become_8_bit_by_clamping_then_rounding():
    values = torch.tensor([-0.5, 0.0, 0.4 / 255, 0.6 / 255, 0.5, 254.6 / 255, 1.0, 1.7])
    images = values.view(1, 1, 1, 8).expand(2, 3, 32, 8)
    images = torch.cat([images, torch.zeros(2, 3, 32, 8)])
    pixels = generated_slices(lambda start, stop: images[start:stop])(1, 3)
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 3, 32, 8)
    assert pixels[0, 0, 0].tolist() == [0, 0, 0, 1, 128, 255, 255, 255]
    assert not pixels[1].any()  # images 1 and 2 of the four: the slice asked for


class FlatFeatures(nn.Module):
    """The first 4 pixel values as features."""

    name = "flat"

    def forward(self, images):
        return images.flatten(1)[:, :4].double()


def test_real_statistics_are_those_of_the_first_images_of_the_split_cached_per_data_file(
    cifar_dir, tmp_path
):
    data = tmp_path / "data"
    shutil.copytree(cifar_dir, data)
    cpu = torch.device("cpu")
    for split, train, n in (("test", False, 10), ("train", True, None)):
        stats = real_statistics(FlatFeatures(), data, split, n, tmp_path / "cache", cpu, 6)
        expected = read_cifar10(data, train=train)[0][:n].flatten(1)[:, :4].double()
        assert stats.count == len(expected) == (10 if n else 80)
        torch.testing.assert_close(stats.mean, expected.mean(0))
        torch.testing.assert_close(stats.covariance, torch.cov(expected.T))
    write_cifar10(data, seed=1)  # other files: other statistics, not the cached ones
    stats = real_statistics(FlatFeatures(), data, "test", 10, tmp_path / "cache", cpu, 6)
    expected = read_cifar10(data, train=False)[0][:10].flatten(1)[:, :4].double()
    torch.testing.assert_close(stats.mean, expected.mean(0))


def test_a_samplers_images_are_one_draw_of_n_latents_whatever_the_network_batch(
    cifar_dir, tmp_path
):
    torch.manual_seed(0)
    vae = VAE(MLPEncoder(2, [8]), MLPDecoder(2, [8]), latent_dim=2).eval()
    images = read_cifar10(cifar_dir, train=False)[0][:10]
    z = torch.randn(10, 2, generator=torch.Generator().manual_seed(7))
    pixels = generated_slices(lambda start, stop: vae.decode(z[start:stop]))(0, 10)
    train = stats_of(FlatFeatures()(read_cifar10(cifar_dir, train=True)[0]))
    expected = frechet_distance(stats_of(FlatFeatures()(pixels)), train)
    for batch_size in (3, 10):
        cache = tmp_path / f"cache{batch_size}"
        scores = fid_scores(
            FlatFeatures(), vae, images, {"prior": PriorSampler(2)}, {"prior": {}}, cifar_dir,
            cache, "checkpoint", 7, batch_size,
        )  # fmt: skip
        assert scores["fid_prior"] == pytest.approx(expected, rel=1e-9), batch_size


def test_statistics_are_cached_under_their_key(tmp_path):
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    extractor = CountingExtractor()

    def compute(partial):
        return feature_statistics(extractor, image_slices(images, "cpu"), 40, "x", partial, 10)

    first = cached_statistics(tmp_path, {"n": 40, "files": "abc"}, compute)
    again = cached_statistics(tmp_path, {"files": "abc", "n": 40}, compute)
    assert extractor.images == 40 and again.count == first.count == 40
    torch.testing.assert_close(again.total, first.total)
    torch.testing.assert_close(again.outer, first.outer)
    # the file names that earlier versions wrote, so that their caches are found
    name = hashlib.sha256(b'{"files": "abc", "n": 40}').hexdigest()[:20]
    assert json.loads((tmp_path / f"{name}.json").read_text()) == {"files": "abc", "n": 40}
    assert (tmp_path / f"{name}.json").read_text().startswith('{\n "files": "abc",')
    cached_statistics(tmp_path, {"n": 40, "files": "abd"}, compute)  # other data: computed
    assert extractor.images == 80
    assert not list(tmp_path.glob("*.partial.pt"))


def test_an_interrupted_cached_pass_resumes(tmp_path):
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)

    def compute(extractor):
        slices = image_slices(images, "cpu")
        return lambda partial: feature_statistics(extractor, slices, 40, "x", partial, 10, 20)

    with pytest.raises(KeyboardInterrupt):
        cached_statistics(tmp_path, {"n": 40}, compute(CountingExtractor(3)))
    resumed = CountingExtractor()
    cached_statistics(tmp_path, {"n": 40}, compute(resumed))
    assert resumed.images == 20  # after the 20 that the partial file counted
    assert not list(tmp_path.glob("*.partial.pt"))  # removed once the statistics are stored


def test_a_real_pass_is_keyed_by_network_split_count_and_files_and_resumes(tmp_path, capsys):
    """1,250 training images (a chunk of 1,000 is saved): a pass stopped after 1,200 resumes
    after 1,000, in batches of the size asked for."""
    data = write_cifar10(tmp_path / "data", images_per_file=250)
    cpu, cache = torch.device("cpu"), tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        real_statistics(CountingExtractor(6), data, "train", None, cache, cpu, 200)
    resumed = CountingExtractor()
    real_statistics(resumed, data, "train", None, cache, cpu, 200)
    assert resumed.images == 250 and resumed.calls == 2
    assert "FID features of the train set: 1250/1250 images" in capsys.readouterr().err
    counting = CountingExtractor()
    real_statistics(counting, data, "test", 12, cache, cpu, 6)
    assert counting.calls == 2  # 12 images in batches of 6
    folder = data / "cifar-10-batches-py"
    keys = [json.loads(path.read_text()) for path in cache.glob("*.json")]
    by_split = {key["split"]: key for key in keys}
    digest = hashlib.sha256((folder / "test_batch").read_bytes()).hexdigest()
    assert by_split["test"] == {
        "network": "counting",
        "split": "test",
        "num_images": 12,
        "files": {"test_batch": digest},
    }
    assert by_split["train"]["num_images"] == 1250
    assert list(by_split["train"]["files"]) == [f"data_batch_{i}" for i in range(1, 6)]


def test_a_given_weights_file_that_is_missing_or_another_is_named(tmp_path):
    with pytest.raises(FIDNetworkError, match=r"inception_weights=.*nothing\.pt: there is no"):
        build_extractor("tf_inception", inception_weights=str(tmp_path / "nothing.pt"))
    (tmp_path / "other.pt").write_bytes(b"not the network")
    with pytest.raises(FIDNetworkError, match="another SHA-1"):
        build_extractor("tf_inception", inception_weights=str(tmp_path / "other.pt"))


def test_without_the_fid_extra_the_default_network_is_unavailable(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FIDUnavailableError, match=r"TF-Inception weights are not installed"):
        build_extractor("tf_inception")


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", "checkpoint"])
def test_a_feature_extractor_file_that_does_not_load_is_named(content, tmp_path):
    path = tmp_path / "extractor.pt"
    if content == "checkpoint":
        torch.save({"state_dict": {"weight": torch.ones(2)}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(FIDNetworkError, match=r"^--feature-extractor=.* does not load as the"):
        build_extractor("tf_inception", str(path), settings=OPTIONS)


def test_the_tf_inception_network_sees_pixels_scaled_to_minus_one_up_to_almost_one():
    """Two constant images pin the affine map k -> k / 128 - 1: 128 becomes 0 and 0 becomes -1
    (a constant image stays constant through the resize)."""
    try:
        network = TFInception(tf_inception_file())
    except FIDUnavailableError:
        pytest.skip("the fid extra is not installed")
    with torch.no_grad():
        for value, scaled in ((128, 0.0), (0, -1.0)):
            images = torch.full((1, 3, 32, 32), value, dtype=torch.uint8)
            expected = network.net(torch.full((1, 3, 299, 299), scaled))
            torch.testing.assert_close(network(images), expected, atol=1e-5, rtol=1e-5)


def test_the_tf_inception_network_gives_pool3_features():
    try:
        path = tf_inception_file()
    except FIDUnavailableError:
        pytest.skip("the fid extra is not installed")
    network = TFInception(path)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        features = network(images)
    assert features.shape == (2, 2048) and features.min() >= 0  # after ReLU and pooling
    standard_layout = load_torchscript(path).eval()  # the network as shipped, NCHW
    with torch.no_grad():
        torch.testing.assert_close(network(images[:1]), features[:1], atol=1e-4, rtol=1e-4)
        scaled = tf_bilinear_resize(images.float()) / 128.0 - 1.0
        torch.testing.assert_close(features, standard_layout(scaled), atol=1e-4, rtol=1e-4)


@pytest.mark.cli
def test_the_fid_command_compares_the_splits_and_caches_them(cifar_dir, tmp_path):
    extractor = tmp_path / "features.pt"
    torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(3072, 5))).save(str(extractor))
    args = [f"--data-dir={cifar_dir}", f"--feature-extractor={extractor}"]
    args += [f"--cache-dir={tmp_path / 'cache'}", f"--output={tmp_path / 'fid.json'}"]
    args += ["--num-train=40", "--num-test=12"]
    proc = run_module("vae_lightning.fid", args, cwd=tmp_path)
    assert proc.stdout.startswith("FID(train 40, test 12) = ")
    result = json.loads((tmp_path / "fid.json").read_text())
    assert result["num_train"] == 40 and result["num_test"] == 12
    net = load_torchscript(extractor)
    train, test = (read_cifar10(cifar_dir, train=t)[0][:n] for t, n in ((True, 40), (False, 12)))
    with torch.no_grad():
        expected = frechet_distance(stats_of(net(test / 255.0)), stats_of(net(train / 255.0)))
    assert result["fid"] == pytest.approx(expected, rel=1e-5)  # in calls of 8 images, the default
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    again = run_module("vae_lightning.fid", args, cwd=tmp_path)
    assert "FID features" not in again.stderr  # both sets from the cache
    assert json.loads((tmp_path / "fid.json").read_text())["fid"] == result["fid"]


def test_pass_progress_reports_each_crossed_interval_and_the_end(monkeypatch, capsys):
    clock = iter(range(100))  # one second per reading: no line is due by time
    monkeypatch.setattr(pass_progress.time, "perf_counter", lambda: next(clock))
    report = pass_progress.PassProgress("Likelihood estimates (K = 5)", total=2500, every=1000)
    for done in (400, 800, 1200, 1600, 2000, 2500):
        report.advance_to(done)
    lines = capsys.readouterr().err.splitlines()  # not a terminal: one line each
    assert lines == [
        "Likelihood estimates (K = 5): 1200/2500 images, 400.0 images/s, ~0 min left",
        "Likelihood estimates (K = 5): 2000/2500 images, 400.0 images/s, ~0 min left",
        "Likelihood estimates (K = 5): 2500/2500 images, 416.7 images/s, ~0 min left",
    ]


def test_a_slow_pass_reports_at_least_every_ten_seconds(monkeypatch, capsys):
    clock = iter(range(0, 1000, 4))  # a batch of 10 images every 4 s (K = 1000 on a CPU)
    monkeypatch.setattr(pass_progress.time, "perf_counter", lambda: next(clock))
    report = pass_progress.PassProgress("Likelihood estimates (K = 1000)", total=1000)
    saves = [report.advance_to(done) for done in range(10, 101, 10)]
    lines = capsys.readouterr().err.splitlines()
    assert lines == [  # at 12 s, 24 s and 36 s: the first reading 10 s or more after the last
        "Likelihood estimates (K = 1000): 30/1000 images, 2.5 images/s, ~6 min left",
        "Likelihood estimates (K = 1000): 60/1000 images, 2.5 images/s, ~6 min left",
        "Likelihood estimates (K = 1000): 90/1000 images, 2.5 images/s, ~6 min left",
    ]
    assert not any(saves)  # a line by time is no chunk for a pass to save at


def test_a_crafted_inception_weights_file_runs_no_code(tmp_path, monkeypatch):
    """torch-fidelity unpickles its weights file whole; it is read as weights only first."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    weights, marker = tmp_path / "inception.pth", tmp_path / "marker"
    torch.save({"fc.weight": torch.ones(2), "payload": LeavesMarker(marker)}, weights)
    with pytest.raises(FIDNetworkError, match=r"inception_weights=.* does not load as the"):
        build_extractor("torch_fidelity", inception_weights=str(weights))
    assert not marker.exists()

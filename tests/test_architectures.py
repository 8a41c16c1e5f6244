"""Every architecture, built from its config, works with any latent size."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vae_lightning.core import architectures

ARCH_DIR = Path(__file__).resolve().parents[1] / "conf" / "model" / "arch"
ARCHS = sorted(p.stem for p in ARCH_DIR.glob("*.yaml"))


def test_the_three_architectures_are_configured():
    assert ARCHS == ["conv", "conv_bn", "mlp", "resnet"]


def test_conv_bn_has_the_layer_plan_of_ghosh_et_al():
    cfg = OmegaConf.load(ARCH_DIR / "conv_bn.yaml")
    encoder = instantiate(cfg.encoder, latent_dim=128).eval()
    decoder = instantiate(cfg.decoder, latent_dim=128, out_channels=3).eval()
    shapes = []
    for net in (encoder, decoder):
        hooks = [
            m.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
            for m in net
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.Linear)
        ]
        net(torch.rand(2, 3, 32, 32) if net is encoder else torch.randn(2, 128))
        for hook in hooks:
            hook.remove()
    assert shapes == [
        (128, 16, 16),
        (256, 8, 8),
        (512, 4, 4),
        (1024, 2, 2),
        (256,),  # mu and log-variance
        (1024 * 8 * 8,),
        (512, 16, 16),
        (256, 32, 32),
    ]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("latent_dim", "out_channels"), [(1, 3), (2, 6), (32, 3), (128, 100)])
def test_shapes_and_gradients(arch, latent_dim, out_channels):
    cfg = OmegaConf.load(ARCH_DIR / f"{arch}.yaml")
    encoder = instantiate(cfg.encoder, latent_dim=latent_dim)
    decoder = instantiate(cfg.decoder, latent_dim=latent_dim, out_channels=out_channels)
    x = torch.rand(4, 3, 32, 32)
    h = encoder(x)
    assert h.shape == (4, 2 * latent_dim)
    out = decoder(h[:, :latent_dim])
    assert out.shape == (4, out_channels, 32, 32)
    out.sum().backward()
    for net in (encoder, decoder):
        assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize(
    ("target", "settings", "message"),
    [
        ("MLPEncoder", {"hidden_dims": []}, "hidden_dims=[]: it must be a list of integers >= 1"),
        ("MLPDecoder", {"hidden_dims": [0]}, "hidden_dims=[0]: it must be a list of integers >= 1"),
        ("MLPDecoder", {"out_channels": 0}, "out_channels=0: it must be an integer >= 1"),
        (
            "ConvEncoder",
            {"channels": [8] * 6},
            "channels=[8, 8, 8, 8, 8, 8]: it must be a list of integers >= 1 and at most 5 entries",
        ),
        (
            "ConvDecoder",
            {"channels": [8] * 6},
            "channels=[8, 8, 8, 8, 8, 8]: it must be a list of integers >= 1 and at most 5 entries",
        ),
        ("ConvDecoder", {"out_channels": True}, "out_channels=True: it must be an integer >= 1"),
    ],
)
def test_a_bad_layer_setting_is_refused_by_name(target, settings, message):
    build = getattr(architectures, target)
    with pytest.raises(ValueError) as refused:
        build(latent_dim=2, **settings)
    assert str(refused.value) == message

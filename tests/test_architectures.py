"""Every architecture, built from its config, works with any latent size."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.nn import functional as F

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
        (
            "ResNetEncoder",
            {"channels": [8] * 6},
            "channels=[8, 8, 8, 8, 8, 8]: it must be a list of integers >= 1 and at most 5 entries",
        ),
        (
            "ResNetEncoder",
            {"blocks_per_stage": 0},
            "blocks_per_stage=0: it must be an integer >= 1",
        ),
        (
            "ResNetDecoder",
            {"channels": [8] * 6},
            "channels=[8, 8, 8, 8, 8, 8]: it must be a list of integers >= 1 and at most 5 entries",
        ),
        (
            "ResNetDecoder",
            {"blocks_per_stage": 0},
            "blocks_per_stage=0: it must be an integer >= 1",
        ),
        ("ResNetDecoder", {"out_channels": 0}, "out_channels=0: it must be an integer >= 1"),
        (
            "ConvBNEncoder",
            {"channels": [8] * 6},
            "channels=[8, 8, 8, 8, 8, 8]: it must be a list of integers >= 1 and at most 5 entries",
        ),
        (
            "ConvBNDecoder",
            {"channels": [8] * 7},
            "channels=[8, 8, 8, 8, 8, 8, 8]: it must be a "
            "list of integers >= 1 and at most 6 entries",
        ),
        ("ConvBNDecoder", {"out_channels": 0}, "out_channels=0: it must be an integer >= 1"),
    ],
)
def test_a_bad_layer_setting_is_refused_by_name(target, settings, message):
    build = getattr(architectures, target)
    with pytest.raises(ValueError) as refused:
        build(latent_dim=2, **settings)
    assert str(refused.value) == message


def test_the_most_stages_each_architecture_allows_build():
    """5 halvings for every encoder and the conv, resnet decoders (32 -> 1); 6 entries for
    conv_bn's decoder, whose first is the linear map's width."""
    z = torch.randn(2, 3)
    for name in ("ConvEncoder", "ResNetEncoder", "ConvBNEncoder"):
        assert getattr(architectures, name)(3, channels=[4] * 5)(
            torch.rand(2, 3, 32, 32)
        ).shape == (2, 6)
    for name, widths in (("ConvDecoder", 5), ("ResNetDecoder", 5), ("ConvBNDecoder", 6)):
        assert getattr(architectures, name)(3, channels=[4] * widths)(z).shape == (2, 3, 32, 32)


def test_a_residual_block_adds_two_normalized_convolutions_to_its_input():
    torch.manual_seed(0)
    block = architectures.ResidualBlock(16)
    for layer in block.body:  # not the identity-like initial norms
        if isinstance(layer, torch.nn.GroupNorm):
            torch.nn.init.normal_(layer.weight)
            torch.nn.init.normal_(layer.bias)
    norm1, _, conv1, norm2, _, conv2 = block.body
    x = torch.randn(2, 16, 8, 8)
    h = F.silu(F.group_norm(x, 8, norm1.weight, norm1.bias))
    h = F.silu(F.group_norm(conv1(h), 8, norm2.weight, norm2.bias))
    torch.testing.assert_close(block(x), x + conv2(h))


def test_the_resnet_layer_plan():
    encoder = architectures.ResNetEncoder(4)
    assert sum(isinstance(m, architectures.ResidualBlock) for m in encoder) == 3  # one a stage
    assert encoder[0](torch.rand(1, 3, 32, 32)).shape == (1, 32, 32, 32)
    decoder = architectures.ResNetDecoder(4, channels=(16, 4, 2))
    assert sum(isinstance(m, architectures.ResidualBlock) for m in decoder) == 3
    assert decoder[-3].num_groups == 2  # the last width's, at most 8

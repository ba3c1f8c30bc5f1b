from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from tirsynth.cli import cli
from tirsynth.config import ModelConfig, TrainConfig, load_config
from tirsynth.models import (
    PatchDiscriminator,
    build_discriminator,
    build_generator,
    count_parameters,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
TRAIN_CONFIGS = [p for p in CONFIGS if p.name != "ingest.yaml"]


def test_paper_parameter_counts():
    # RGB in, 3 channels out, ngf 64, depth 8 (SPEC: the paper's "47M from 54M").
    sparse = build_generator(ModelConfig(out_channels=3, skips="sparse"))
    dense = build_generator(ModelConfig(out_channels=3, skips="dense"))
    assert count_parameters(sparse) == 47_991_427
    assert count_parameters(dense) == 54_413_955


@pytest.mark.parametrize(
    "skips,pairs",
    [
        ("sparse", [(1, 15), (3, 13), (5, 11), (7, 9)]),
        ("dense", [(e, 16 - e) for e in range(1, 8)]),
        ("low", [(1, 15), (3, 13)]),
        ("high", [(5, 11), (7, 9)]),
    ],
)
def test_which_encoder_features_reach_which_decoder_layer(skips, pairs):
    generator = build_generator(ModelConfig(ngf=2, skips=skips)).eval()
    assert generator.skip_pairs() == pairs
    encoder_out, decoder_in = {}, {}
    for e, layer in enumerate(generator.encoder, start=1):
        layer.register_forward_hook(lambda m, i, o, e=e: encoder_out.__setitem__(e, o))
    for n, layer in enumerate(generator.decoder, start=9):  # paper numbering 9..16
        layer.register_forward_hook(lambda m, i, o, n=n: decoder_in.__setitem__(n, i[0]))
    generator(torch.randn(1, 3, 256, 256))
    reached = []
    for e in range(1, 8):
        feature = encoder_out[e]
        # The skip of (e, 16-e) is concatenated onto layer 16-e's output: layer 17-e reads it.
        consumer = decoder_in[17 - e]
        channels = feature.shape[1]
        if consumer.shape[1] == 2 * channels and torch.equal(consumer[:, :channels], feature):
            reached.append((e, 16 - e))
    assert reached == pairs


@pytest.mark.parametrize("config", TRAIN_CONFIGS, ids=lambda p: p.stem)
def test_every_config_builds_and_runs(config):
    cfg = load_config(config, TrainConfig, ["model.ngf=4", "model.ndf=4"]).model
    generator, discriminator = build_generator(cfg), build_discriminator(cfg)
    side = 2**cfg.depth
    rgb = torch.randn(2, 3, side, side, requires_grad=True)
    fake = generator(rgb)
    assert fake.shape == (2, cfg.out_channels, side, side)
    assert fake.abs().max() <= 1  # Tanh
    logits = discriminator(rgb, fake)
    assert logits.shape[:2] == (2, 1)
    logits.mean().backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0


def test_tiny_model_is_tiny_and_70px_patchgan_is_30x30_on_256():
    tiny = load_config(Path(CONFIGS[0]).parent / "tiny.yaml", TrainConfig).model
    assert count_parameters(build_generator(tiny)) < 50_000  # vs 48M at full size
    logits = build_discriminator(ModelConfig(ndf=4))(
        torch.zeros(1, 3, 256, 256), torch.zeros(1, 1, 256, 256)
    )
    assert logits.shape == (1, 1, 30, 30)


def test_pix2pix_initialisation():
    """init_type normal, gain 0.02: conv weights N(0, 0.02), BatchNorm weights N(1, 0.02),
    biases 0, in G and D alike."""
    cfg = ModelConfig(ngf=16, ndf=16)
    for model in (build_generator(cfg), build_discriminator(cfg)):
        convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        weights = torch.cat([m.weight.flatten() for m in convs])
        assert abs(weights.mean()) < 1e-3 and abs(weights.std() - 0.02) < 1e-3
        gammas = torch.cat([m.weight for m in norms])
        assert abs(gammas.mean() - 1) < 0.01 and abs(gammas.std() - 0.02) < 0.01
        assert all(torch.all(m.bias == 0) for m in [*convs, *norms] if m.bias is not None)


def test_unet_256_has_dropout_on_the_three_decoder_layers_below_the_innermost():
    generator = build_generator(ModelConfig(ngf=2, skips="dense"))
    with_dropout = [
        i
        for i, layer in enumerate(generator.decoder)
        if any(isinstance(m, nn.Dropout) for m in layer)
    ]
    # decoder[0] is the innermost layer (paper layer 9); pix2pix: layers 10, 11 and 12.
    assert with_dropout == [1, 2, 3]
    assert all(m.p == 0.5 for m in generator.modules() if isinstance(m, nn.Dropout))
    assert not any(
        isinstance(m, nn.Dropout) for m in build_generator(ModelConfig(dropout=0)).modules()
    )


def test_paper_configs_output_three_channels():
    paper = [p for p in TRAIN_CONFIGS if p.stem != "tiny"]
    assert {p.stem for p in paper} >= {"sparse", "pix2pix_dense", "sparse_plus"}
    for path in paper:
        assert load_config(path, TrainConfig).model.out_channels == 3, path.name
    assert ModelConfig().out_channels == 1  # the library default: one TIR channel


def test_bad_skips_are_refused():
    with pytest.raises(ValueError, match="outside"):
        build_generator(ModelConfig(depth=4, skips=(1, 5)))
    with pytest.raises(ValueError, match="skips="):
        ModelConfig(skips="some")


def test_model_command_prints_counts():
    config = Path(CONFIGS[0]).parent / "sparse.yaml"
    result = CliRunner().invoke(
        cli, ["model", str(config), "--set", "model.out_channels=3", "--image-size", "256"]
    )
    assert result.exit_code == 0, result.output
    assert "generator_parameters 47991427" in result.output
    assert "generator_flops_per_image" in result.output


def test_resize_upsampling_leaves_no_checkerboard():
    """model.upsample=resize (nearest 2x, then a 3x3 conv): a flat input gives a flat output
    away from the borders; pix2pix's transposed convs give a period-2 pattern."""
    torch.manual_seed(0)
    centres = {}
    for upsample in ("transpose", "resize"):
        cfg = ModelConfig(upsample=upsample, ngf=8, depth=4, skips=(1, 3), dropout=0)
        generator = build_generator(cfg).eval()
        with torch.no_grad():
            centres[upsample] = generator(torch.full((1, 3, 128, 128), 0.3))[0, 0, 48:80, 48:80]
    assert centres["resize"].std() < 1e-6 < centres["transpose"].std()
    with pytest.raises(ValueError, match="upsample"):
        ModelConfig(upsample="bilinear")


def test_spectral_discriminator_has_no_batchnorm_and_unit_spectral_norm():
    cfg = ModelConfig(ndf=8, disc_norm="spectral")
    disc = build_discriminator(cfg)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in disc.modules())
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(hasattr(m, "parametrizations") for m in convs)
    disc.train()
    for _ in range(20):  # power iteration converges while D runs
        disc(torch.randn(2, 3, 64, 64), torch.randn(2, 1, 64, 64))
    weight = convs[1].weight.flatten(1)
    assert torch.linalg.matrix_norm(weight, ord=2).item() == pytest.approx(1.0, rel=0.05)
    with pytest.raises(ValueError, match="disc_norm"):
        ModelConfig(disc_norm="layer")


def test_input_skip_lets_g_copy_single_pixel_detail():
    """model.input_skip: the input reaches a full-resolution head, so per-pixel detail of
    the input (here: noise, the target being its first channel) is learnt in a few steps;
    through features at half resolution it is not."""
    torch.manual_seed(0)
    rgb = torch.rand(4, 3, 32, 32) * 2 - 1
    target = rgb[:, :1]
    losses = {}
    for input_skip in (False, True):
        torch.manual_seed(0)
        cfg = ModelConfig(ngf=8, depth=3, skips=(1,), dropout=0, input_skip=input_skip)
        generator = build_generator(cfg)
        optimiser = torch.optim.Adam(generator.parameters(), lr=2e-3)
        for _ in range(150):
            loss = torch.nn.functional.l1_loss(generator(rgb), target)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        losses[input_skip] = loss.item()
    assert losses[True] < 0.7 * losses[False], losses  # about 0.55 over seeds 0..3
    assert "head.1.weight" in build_generator(ModelConfig(ngf=8, input_skip=True)).state_dict()


def test_multiscale_discriminator_judges_the_pair_at_halving_resolutions():
    """model.disc_scales=3: three PatchGANs, the second and third on the pair average-pooled
    to 1/2 and 1/4; one scale stays the bare PatchGAN (its checkpoints load unchanged)."""
    assert isinstance(build_discriminator(ModelConfig(ndf=8)), PatchDiscriminator)
    disc = build_discriminator(ModelConfig(ndf=8, disc_scales=3)).eval()
    rgb, tir = torch.randn(2, 3, 128, 96), torch.randn(2, 1, 128, 96)
    logits = disc(rgb, tir)
    assert [tuple(x.shape) for x in logits] == [(2, 1, 14, 10), (2, 1, 6, 4), (2, 1, 2, 1)]
    half = torch.nn.functional.avg_pool2d
    with torch.no_grad():
        quarter = [half(half(x, 3, 2, 1, count_include_pad=False), 3, 2, 1, count_include_pad=False)
                   for x in (rgb, tir)]  # fmt: skip
        assert torch.allclose(disc.scales[2](*quarter), logits[2], atol=1e-6)
        assert torch.allclose(disc.scales[0](rgb, tir), logits[0], atol=1e-6)
    again, features = disc(rgb, tir, features=True)
    assert all(torch.equal(a, b) for a, b in zip(again, logits, strict=True))
    assert len(features) == 3 * (ModelConfig().disc_layers + 1)
    with pytest.raises(ValueError, match="disc_scales"):
        ModelConfig(disc_scales=0)

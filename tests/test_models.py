from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tirsynth.cli import cli
from tirsynth.config import ModelConfig, TrainConfig, load_config
from tirsynth.models import build_discriminator, build_generator, count_parameters

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

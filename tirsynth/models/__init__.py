"""Model builders: config section in, `nn.Module` out."""

from __future__ import annotations

import torch
from torch import nn

from tirsynth.config import ModelConfig
from tirsynth.models.patchgan import MultiScaleDiscriminator, PatchDiscriminator
from tirsynth.models.unet import SPARSE_SKIPS, UNetGenerator

__all__ = [
    "SPARSE_SKIPS",
    "MultiScaleDiscriminator",
    "PatchDiscriminator",
    "UNetGenerator",
    "build_discriminator",
    "build_generator",
    "count_parameters",
    "count_flops",
]


def build_generator(cfg: ModelConfig) -> UNetGenerator:
    """The U-Net generator of `cfg` (skips: the paper's sparse set, or all for pix2pix)."""
    return UNetGenerator(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        base_channels=cfg.ngf,
        depth=cfg.depth,
        skips=cfg.resolved_skips(),
        dropout=cfg.dropout,
        upsample=cfg.upsample,
        input_skip=cfg.input_skip,
    )


def build_discriminator(cfg: ModelConfig) -> PatchDiscriminator | MultiScaleDiscriminator:
    """The conditional PatchGAN of `cfg`; with model.disc_scales > 1, that many of them at
    halving resolutions (one scale is the bare PatchGAN, as the paper and older checkpoints)."""
    patch_args = dict(
        in_channels=cfg.in_channels + cfg.out_channels,
        base_channels=cfg.ndf,
        num_layers=cfg.disc_layers,
        norm=cfg.disc_norm,
    )
    if cfg.disc_scales == 1:
        return PatchDiscriminator(**patch_args)
    return MultiScaleDiscriminator(cfg.disc_scales, **patch_args)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_flops(module: nn.Module, *inputs: torch.Tensor) -> int:
    """Floating-point operations of one forward pass (a multiply-add counts as 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*inputs)
    return counter.get_total_flops()

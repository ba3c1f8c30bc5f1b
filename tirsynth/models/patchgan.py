"""70x70 conditional PatchGAN discriminator (paper Sec. III-B, Fig. 3; pix2pix `basic`)."""

from __future__ import annotations

import torch
from torch import nn

from tirsynth.models.unet import init_pix2pix


class PatchDiscriminator(nn.Module):
    """Convs 64-128-256-512-1, 4x4, strides 2,2,2,1,1, padding 1, LeakyReLU 0.2 after all
    but the last; BatchNorm on the middle three. Conditional: it sees RGB and TIR together.

    Args:
        in_channels: RGB channels plus TIR channels.
        base_channels: channels of the first conv (pix2pix's ndf).
        num_layers: stride-2 convs after the first (3 gives the 70x70 receptive field).
        norm: "batch" (pix2pix) or "spectral": every conv spectrally normalised and no
            BatchNorm (Miyato et al. 2018), which bounds how fast D can win on small data.
    """

    def __init__(
        self,
        *,
        in_channels: int = 4,
        base_channels: int = 64,
        num_layers: int = 3,
        norm: str = "batch",
    ):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        width = base_channels
        for n in range(1, num_layers + 1):
            stride = 2 if n < num_layers else 1
            width_out = base_channels * min(2**n, 8)
            batch_norm = norm == "batch"
            layers += [
                nn.Conv2d(width, width_out, 4, stride=stride, padding=1, bias=not batch_norm),
                nn.BatchNorm2d(width_out) if batch_norm else nn.Identity(),
                nn.LeakyReLU(0.2),
            ]
            width = width_out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)
        init_pix2pix(self)
        if norm == "spectral":
            for layer in self.model:
                if isinstance(layer, nn.Conv2d):
                    nn.utils.parametrizations.spectral_norm(layer)
        elif norm != "batch":
            raise ValueError(f"discriminator norm {norm!r} is not batch or spectral")

    def forward(self, cond: torch.Tensor, tir: torch.Tensor, features: bool = False):
        """(B, C_rgb, H, W), (B, C_tir, H, W) -> (B, 1, H/8 - 2, W/8 - 2) patch logits; with
        `features`, also the activation after each LeakyReLU (for feature matching)."""
        x = torch.cat([cond, tir], dim=1)
        if not features:
            return self.model(x)
        found = []
        for layer in self.model:
            x = layer(x)
            if isinstance(layer, nn.LeakyReLU):
                found.append(x)
        return x, found

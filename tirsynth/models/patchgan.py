"""70x70 conditional PatchGAN discriminator (paper Sec. III-B, Fig. 3; pix2pix `basic`),
and pix2pixHD's multi-scale set of them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


class MultiScaleDiscriminator(nn.Module):
    """PatchGANs of the same design on the pair at full resolution, then halved each time
    by a 3x3 average pool (pix2pixHD, Wang et al. 2018): at 1/4 a 70x70 window covers
    280x280 input pixels, a whole car rather than a piece of one.

    Returns a list of logit maps, finest first; with `features`, also every scale's
    activations in one list (feature matching over all of them, as pix2pixHD).
    """

    def __init__(self, scales: int, **patch_args):
        super().__init__()
        self.scales = nn.ModuleList(PatchDiscriminator(**patch_args) for _ in range(scales))

    def forward(self, cond: torch.Tensor, tir: torch.Tensor, features: bool = False):
        logits, found = [], []
        for n, disc in enumerate(self.scales):
            if n:
                cond, tir = (F.avg_pool2d(x, 3, 2, 1, count_include_pad=False) for x in (cond, tir))
            out = disc(cond, tir, features)
            logits.append(out[0] if features else out)
            found += out[1] if features else []
        return (logits, found) if features else logits

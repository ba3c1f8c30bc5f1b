"""U-Net generator with a configurable skip set: the sparse generator of the paper
("Sparse GANs for Thermal Infrared Image Generation From Optical Image", Sec. III-A, Fig. 2)
and, with every skip, pix2pix's `unet_256`.

Numbering the 2*depth layers in order (encoder 1..depth, decoder depth+1..2*depth), skip
level e joins encoder layer e to decoder layer 2*depth-e: the paper's sparse set {1,3,5,7}
is the pairs (1,15), (3,13), (5,11), (7,9).
"""

from __future__ import annotations

import torch
from torch import nn

SPARSE_SKIPS = (1, 3, 5, 7)


class UNetGenerator(nn.Module):
    """Encoder of `depth` stride-2 convs, decoder of `depth` stride-2 transposed convs.

    Args:
        in_channels: input image channels (3 for RGB).
        out_channels: generated channels (1 for single-channel TIR; 3 as in the paper).
        base_channels: channels of the first layer (pix2pix's ngf), doubling to 8x.
        depth: number of encoder layers; the input side must be divisible by 2**depth.
        skips: encoder levels (1..depth-1) whose features reach the decoder layer of the
            same spatial size.
        dropout: dropout probability in the three decoder layers after the innermost one
            (pix2pix's noise z); 0 turns it off.
        upsample: "transpose" (pix2pix and the paper: 4x4 stride-2 transposed convs) or
            "resize" (nearest 2x resize, then a 3x3 conv: no checkerboard, Odena et al.
            2016, "Deconvolution and Checkerboard Artifacts").
        input_skip: skip level 0: the input itself joins the last decoder layer's
            features at full resolution, and a 3x3 conv and a 1x1 conv make the output.
            Without it the finest features G has are at half resolution.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int = 1,
        base_channels: int = 64,
        depth: int = 8,
        skips: tuple[int, ...] = SPARSE_SKIPS,
        dropout: float = 0.5,
        upsample: str = "transpose",
        input_skip: bool = False,
    ):
        super().__init__()
        if upsample not in ("transpose", "resize"):
            raise ValueError(f"upsample must be transpose or resize, got {upsample!r}")
        if depth < 2:
            raise ValueError(f"depth must be >= 2, got {depth}")
        bad = [s for s in skips if not 1 <= s < depth]
        if bad:
            raise ValueError(f"skips {bad} outside 1..{depth - 1} for depth {depth}")
        self.depth = depth
        self.skips = tuple(sorted(set(skips)))
        # channels[e]: output channels of encoder layer e (channels[0] is the input).
        channels = [in_channels] + [
            base_channels * min(2 ** (e - 1), 8) for e in range(1, depth + 1)
        ]
        self.encoder = nn.ModuleList(
            encoder_layer(channels[e - 1], channels[e], norm=1 < e < depth, activation=e < depth)
            for e in range(1, depth + 1)
        )
        # decoder[i] undoes encoder level e = depth - i; it reads channels[e], doubled when
        # the skip of level e was concatenated onto it, and makes channels[e - 1].
        self.decoder = nn.ModuleList()
        for e in range(depth, 0, -1):
            width_in = channels[e] * (2 if e in self.skips else 1)
            width_out = channels[e - 1] if e > 1 else base_channels if input_skip else out_channels
            # pix2pix's unet_256: the three decoder layers after the innermost one.
            uses_dropout = dropout > 0 and depth - 3 <= e < depth and e > 1
            self.decoder.append(
                decoder_layer(
                    width_in,
                    width_out,
                    outermost=e == 1 and not input_skip,
                    dropout=dropout if uses_dropout else 0.0,
                    upsample=upsample,
                )
            )
        self.head = input_head(in_channels, base_channels, out_channels) if input_skip else None
        init_pix2pix(self)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H, W)
        features = []
        h = rgb
        for layer in self.encoder:
            h = layer(h)  # (B, channels[e], H / 2**e, W / 2**e)
            features.append(h)
        for i, layer in enumerate(self.decoder):
            level = self.depth - i  # encoder level whose features h now has the size of
            if level < self.depth and level in self.skips:
                h = torch.cat([features[level - 1], h], dim=1)  # the skip: (1,15), (3,13)...
            h = layer(h)
        if self.head is not None:
            h = self.head(torch.cat([rgb, h], dim=1))
        return h

    def skip_pairs(self) -> list[tuple[int, int]]:
        """(encoder layer, decoder layer) pairs in the paper's 1..2*depth numbering."""
        return [(e, 2 * self.depth - e) for e in self.skips]


def init_pix2pix(module: nn.Module, gain: float = 0.02) -> None:
    """pix2pix's `init_type normal`: conv weights N(0, gain), BatchNorm weights N(1, gain),
    biases 0. GAN training on small datasets is sensitive to PyTorch's default instead."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(layer.weight, 0.0, gain)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.normal_(layer.weight, 1.0, gain)
        else:
            continue
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


class ReluAfter(nn.Module):
    """ReLU on the channels after the first `keep`: the input beside features passes as is."""

    def __init__(self, keep: int):
        super().__init__()
        self.keep = keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, : self.keep], torch.relu(x[:, self.keep :])], dim=1)


def input_head(in_channels: int, width: int, out_channels: int) -> nn.Sequential:
    """The output of skip level 0: ReLU'd decoder features beside the raw input, a 3x3 conv
    that can place edges at the input's own pixels, then a 1x1 conv and Tanh."""
    return nn.Sequential(
        ReluAfter(in_channels),
        nn.Conv2d(in_channels + width, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, out_channels, 1),
        nn.Tanh(),
    )


def encoder_layer(width_in: int, width_out: int, *, norm: bool, activation: bool) -> nn.Sequential:
    """Conv 4x4/2 -> BatchNorm -> LeakyReLU(0.2).

    pix2pix puts the LeakyReLU at the start of the next layer, in place, so its skips carry
    activated features; ending each layer with it is the same network, said plainly.
    """
    layers: list[nn.Module] = [nn.Conv2d(width_in, width_out, 4, stride=2, padding=1, bias=False)]
    if norm:
        layers.append(nn.BatchNorm2d(width_out))
    if activation:
        layers.append(nn.LeakyReLU(0.2))
    return nn.Sequential(*layers)


def decoder_layer(
    width_in: int, width_out: int, *, outermost: bool, dropout: float, upsample: str = "transpose"
) -> nn.Sequential:
    """ReLU -> ConvTranspose 4x4/2 (or 2x resize + Conv 3x3) -> BatchNorm [-> Dropout]; the
    outermost ends in Tanh."""
    layers: list[nn.Module] = [nn.ReLU()]
    if upsample == "resize":
        layers += [
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(width_in, width_out, 3, padding=1, bias=outermost),
        ]
    else:
        layers.append(
            nn.ConvTranspose2d(width_in, width_out, 4, stride=2, padding=1, bias=outermost)
        )
    if outermost:
        layers.append(nn.Tanh())
        return nn.Sequential(*layers)
    layers.append(nn.BatchNorm2d(width_out))
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)

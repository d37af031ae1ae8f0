"""A compact 2D U-Net that can also return full-resolution pixel features, or decode a second,
feature-perturbed branch (UniMatch's dropout on the encoder features)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DoubleConv(nn.Sequential):
    """(Conv3x3 -> BatchNorm -> ReLU) x 2; padding keeps the spatial size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            # bias=False: BatchNorm's shift makes a conv bias redundant.
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """Bilinear 2x upsample, concat the encoder skip, then DoubleConv.

    Bilinear upsampling (rather than transposed conv) avoids checkerboard artefacts and is
    deterministic on GPU, which matters for reproducible sweeps.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = DoubleConv(in_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """2D U-Net with ``depth`` down-sampling stages.

    Channels double at each stage: ``base_channels * 2**i`` for encoder stage ``i``, with a
    ``base_channels * 2**depth`` bottleneck. The last decoder stage has ``base_channels``
    channels at full input resolution; that map is what ``return_features`` exposes
    (``feature_dim == base_channels``) for contrastive / nearest-reference methods.

    ``seg_convs=True`` puts two 3x3 conv-BN-ReLU layers (width ``base_channels``) before the 1x1
    classifier, both inside ``head`` (keys ``head.0.*``, ``head.1.*``): the segmentation-specific
    layers of Chaitanya et al. (krishnabits001/pseudo_label_contrastive_training, ``seg_c1_a/b``),
    so features stay the decoder map and a contrastive loss on them is not the classifier's input.
    """

    def __init__(
        self, in_channels: int, num_classes: int, base_channels: int = 16, depth: int = 3,
        seg_convs: bool = False,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("in_channels", in_channels, 1),
            ("num_classes", num_classes, 1),
            ("base_channels", base_channels, 1),
            ("depth", depth, 1),
        ):
            if value < low:
                raise ValueError(f"UNet {name} must be >= {low}, got {value}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.depth = depth
        self.feature_dim = base_channels

        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList()
        prev = in_channels
        for width in widths[:-1]:
            self.encoders.append(DoubleConv(prev, width))
            prev = width
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(widths[-2], widths[-1])
        # Decoder goes bottom-up: stage i takes widths[i + 1] and the skip of width widths[i].
        self.decoders = nn.ModuleList(
            Up(widths[i + 1], widths[i], widths[i]) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(base_channels, num_classes, kernel_size=1)
        if seg_convs:  # Chaitanya et al.'s g_xi: the head gets layers of its own (local_contrastive)
            self.head = nn.Sequential(DoubleConv(base_channels, base_channels), self.head)

    @property
    def size_divisor(self) -> int:
        """H and W must be multiples of this so every pooling halves an even size."""
        return 2**self.depth

    def forward(
        self, x: torch.Tensor, return_features: bool = False, feature_dropout: float | None = None,
        return_decoder_maps: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (B, num_classes, H, W), or (logits, features (B, feature_dim, H, W)).

        With ``return_decoder_maps`` it returns (logits, every decoder stage's output map,
        coarsest first): stage i has ``base_channels * 2**(depth - 1 - i)`` channels at
        ``1 / 2**(depth - 1 - i)`` of the input size, and the last map is the one
        ``return_features`` gives. For methods that match pixels on a layer other than the one
        the head classifies (reference_guided's ``feature_layer``).

        With ``feature_dropout=p`` it returns (clean logits, perturbed logits) instead: the
        perturbed branch decodes the encoder features (every skip and the bottleneck) after
        channel-wise Dropout2d(p), UniMatch's feature perturbation (its ``need_fp``). Both halves
        go through the decoder as one batch of 2B, as in UniMatch, so decoder BatchNorm sees both.
        The dropout is applied whatever the module's mode: asking for it is asking for the noise.
        A keyword of ``forward`` (not a second method) so that a DDP wrapper still syncs grads.
        """
        self._check_input(x)
        if return_decoder_maps and (return_features or feature_dropout is not None):
            raise ValueError("UNet: return_decoder_maps cannot be combined with "
                             "return_features or feature_dropout")
        skips, bottom = self._encode(x)
        if return_decoder_maps:
            maps = self._decode_maps(skips, bottom)
            return self.head(maps[-1]), maps
        if feature_dropout is None:
            x = self._decode(skips, bottom)
            logits = self.head(x)
            return (logits, x) if return_features else logits
        if return_features:
            raise ValueError("UNet: return_features and feature_dropout cannot be combined")
        if not 0.0 <= feature_dropout < 1.0:
            raise ValueError(f"UNet feature_dropout={feature_dropout}: expected a value in [0, 1)")

        def with_perturbed(feature: torch.Tensor) -> torch.Tensor:
            return torch.cat([feature, F.dropout2d(feature, feature_dropout, training=True)])

        logits = self.head(self._decode([with_perturbed(s) for s in skips], with_perturbed(bottom)))
        clean, perturbed = logits.chunk(2)
        return clean, perturbed

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet expects input (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        div = self.size_divisor
        if h % div or w % div:
            raise ValueError(
                f"UNet input size {h}x{w} is not divisible by {div} "
                f"(2**depth with depth={self.depth}); pad or resize H and W to multiples of {div}"
            )

    def _encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The encoder's skip features (top to bottom) and the bottleneck features."""
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        return skips, self.bottleneck(x)

    def _decode_maps(self, skips: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
        """Every decoder stage's output, coarsest first; the last is `_decode`'s map."""
        maps = []
        for decoder, skip in zip(self.decoders, reversed(skips)):
            x = decoder(x, skip)
            maps.append(x)
        return maps

    def _decode(self, skips: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The last decoder map (B, feature_dim, H, W) from the encoder's features."""
        for decoder, skip in zip(self.decoders, reversed(skips)):
            x = decoder(x, skip)
        return x

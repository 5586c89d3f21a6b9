"""Class-conditional UNet: diffusers' UNet2DConditionModel, the class entering by cross-attention, by
the time embedding, or both.

Paper B.3: an ADM-style UNet whose class condition enters through cross-attention, produced by a
trainable "nn encoder". Here that encoder is an `nn.Embedding(num_classes + 1, dim)`: row
`num_classes` is the null label used for classifier-free guidance, and the embedding is fed to the
UNet as `encoder_hidden_states` of `class_tokens` tokens. The alternative (`conditioning:
time_embedding`, ADM's and most class-conditional diffusion models' way; diffusers' `num_class_embeds`)
adds a learned class embedding, with the same null row, to the time embedding that every residual
block receives; the blocks then have no cross-attention, and the middle block keeps self-attention.

Two diffusers quirks handled here: `attention_head_dim` is really the number of heads in
UNet2DConditionModel (so we pass `attention_heads` there), and the sinusoidal time embedding
expects DDPM-style timesteps in [0, 1000], so continuous t in [0, 1] is scaled by 1000.
"""

from __future__ import annotations

from diffusers import UNet2DConditionModel
from torch import Tensor, nn

from .base import Denoiser

CONDITIONINGS = ("cross_attention", "time_embedding", "both")


class ClassConditionalUNet(Denoiser):
    """Denoiser `f(z, t, labels) -> v` on (B, in_channels, sample_size, sample_size) inputs.

    Args:
        num_classes: number of real classes; label `num_classes` means "no class" (CFG null label).
        in_channels: channels of the model input (12 for a 3-channel image after the Haar wavelet).
        sample_size: side of the model input (image side / 2 with the wavelet).
        block_out_channels: channels per resolution level; the paper's base 128 with multipliers
            (1, 1, 2, 4, 8) is (128, 128, 256, 512, 1024). Level i works at sample_size / 2**i.
        layers_per_block: residual blocks per level (paper: 2).
        cross_attention_resolution: levels whose side is at most this many pixels get
            cross-attention to the class tokens (paper: 16).
        cross_attention_dim: width of the class embedding (paper: 512).
        attention_heads: heads of each attention layer.
        norm_num_groups: GroupNorm groups; must divide every entry of block_out_channels.
        class_tokens: number of tokens the class embedding is split into.
        conditioning: how the class enters: "cross_attention" (the paper's), "time_embedding" (added
            to the time embedding of every residual block; no cross-attention), or "both".
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        sample_size: int,
        block_out_channels: tuple[int, ...] = (128, 128, 256, 512, 1024),
        layers_per_block: int = 2,
        cross_attention_resolution: int = 16,
        cross_attention_dim: int = 512,
        attention_heads: int = 8,
        norm_num_groups: int = 32,
        class_tokens: int = 1,
        conditioning: str = "cross_attention",
    ):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning={conditioning!r} is not one of {CONDITIONINGS}")
        levels = len(block_out_channels)
        if sample_size % 2 ** (levels - 1):
            raise ValueError(
                f"sample_size={sample_size} must be divisible by 2**{levels - 1} "
                f"for {levels} levels of block_out_channels"
            )
        if any(channels % norm_num_groups for channels in block_out_channels):
            raise ValueError(
                f"norm_num_groups={norm_num_groups} must divide every block_out_channels {block_out_channels}"
            )
        attends = [sample_size // 2**level <= cross_attention_resolution for level in range(levels)]
        if conditioning == "time_embedding":
            attends = [False] * levels
        elif not any(attends):
            raise ValueError(
                f"cross_attention_resolution={cross_attention_resolution} is below the lowest UNet resolution "
                f"{sample_size // 2 ** (levels - 1)}: the class would never reach the model"
            )
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.sample_size = sample_size
        self.class_tokens, self.conditioning = class_tokens, conditioning
        cross = conditioning != "time_embedding"
        self.class_encoder = nn.Embedding(num_classes + 1, cross_attention_dim * class_tokens) if cross else None
        self.unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
            mid_block_type="UNetMidBlock2DCrossAttn" if cross else "UNetMidBlock2D",
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=attention_heads,
            norm_num_groups=norm_num_groups,
            num_class_embeds=None if conditioning == "cross_attention" else num_classes + 1,
        )

    def forward(self, z: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        tokens = (
            None if self.class_encoder is None else self.class_encoder(labels).view(len(labels), self.class_tokens, -1)
        )
        embedded = None if self.conditioning == "cross_attention" else labels
        return self.unet(z, t * 1000.0, encoder_hidden_states=tokens, class_labels=embedded).sample

"""Class-conditional Diffusion Transformer (DiT, Peebles & Xie 2023, arXiv:2212.09748).

Follows facebookresearch/DiT ``models.py`` block for block (cited in each class below), trimmed
to what the diffusion classifier needs: the output has as many channels as the input (v-prediction,
no learned sigma), ``t`` is continuous in [0, 1], and label index ``num_classes`` is the null label
for classifier-free guidance.

Why not diffusers' ``DiTTransformer2DModel``: every block there owns its own label embedder with a
hard-coded label dropout of 0.1, so blocks drop labels independently of each other (the
unconditional branch of classifier-free guidance is never a consistent "null" model) and class
conditioning stays stochastic whenever the module is in train mode; it also skips DiT's adaLN-Zero
initialisation. Here the network never drops labels (the training module does, once per sample)
and a fresh model outputs exactly zero, as in the paper.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Denoiser

# DiT paper Table 1 (model sizes) x patch sizes 2, 4, 8; the paper uses DiT-B/4 (Appendix B.4).
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_VARIANTS = {
    f"DiT-{name}/{patch}": dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
    for name, (depth, hidden, heads) in _SIZES.items()
    for patch in (2, 4, 8)
}


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    # DiT models.py `modulate`: one (shift, scale) per sample, broadcast over tokens.
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> Tensor:
    """MAE / DiT ``get_2d_sincos_pos_embed``: half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for the 2D sin-cos embedding, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_h, grid_w = torch.meshgrid(coords, coords, indexing="ij")  # token n = row * size + col

    def embed_1d(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    # DiT's meshgrid(w, h) puts the column first; keep that channel order.
    return torch.cat([embed_1d(grid_w), embed_1d(grid_h)], dim=1).float()


class TimestepEmbedder(nn.Module):
    """DiT ``TimestepEmbedder``: sinusoidal features of the timestep, then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_size, self.max_period = frequency_size, max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        # t in [0, 1] is scaled to [0, 1000] so the frequencies span the range DiT was designed for
        # (integer steps 0..999); otherwise the low frequencies would barely move over [0, 1].
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device) / half)
        args = (t.float() * 1000.0)[:, None] * freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1).to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """timm ``Attention`` as used by DiT, with PyTorch's fused scaled-dot-product kernel."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    """DiT ``DiTBlock`` with adaLN-Zero: c regresses shift/scale/gate for attention and MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        # No affine: the per-sample shift/scale from adaLN take its place.
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden, hidden_size),
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """DiT ``FinalLayer``: adaLN-modulated norm, then a linear map from each token to its patch."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(Denoiser):
    """Class-conditional DiT denoiser: ``forward(z, t, labels) -> tensor shaped like z``.

    ``variant`` (a key of ``DIT_VARIANTS``, e.g. ``"DiT-B/4"``) overrides patch_size, hidden_size,
    depth and num_heads. ``labels == num_classes`` selects the null (unconditional) embedding.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        sample_size: int,
        patch_size: int = 4,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        variant: str | None = None,
    ):
        super().__init__()
        if variant is not None:
            if variant not in DIT_VARIANTS:
                known = ", ".join(DIT_VARIANTS)
                raise ValueError(f"unknown DiT variant {variant!r}; known variants: {known}")
            cfg = DIT_VARIANTS[variant]
            patch_size, hidden_size, depth, num_heads = (
                cfg["patch_size"],
                cfg["hidden_size"],
                cfg["depth"],
                cfg["num_heads"],
            )
        if sample_size % patch_size:
            raise ValueError(f"sample_size ({sample_size}) must be divisible by patch_size ({patch_size})")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self.num_classes, self.in_channels, self.sample_size = num_classes, in_channels, sample_size
        self.patch_size, self.grid_size = patch_size, sample_size // patch_size

        # DiT uses timm's PatchEmbed, which is exactly this conv.
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # DiT ``LabelEmbedder`` minus its dropout: the extra row is the null label.
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)
        # A buffer, not a frozen Parameter: it must stay out of optimisers and EMA but follow .to().
        pos_embed = sincos_pos_embed_2d(hidden_size, self.grid_size)[None]  # (1, T, D)
        self.register_buffer("pos_embed", pos_embed, persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT ``initialize_weights``; the zeroed adaLN and output layers make every block start as
        the identity and the whole model output exactly zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Initialise the patch conv like a linear layer (as DiT does), not with conv defaults.
        nn.init.xavier_uniform_(self.x_embedder.weight.view(self.x_embedder.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [block.adaLN_modulation[-1] for block in self.blocks] + [
            self.final_layer.adaLN_modulation[-1],
            self.final_layer.linear,
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        # (B, h*w, p*p*C) -> (B, C, h*p, w*p), same memory order as DiT's einsum "nhwpqc->nchpwq".
        b, p, g, c = x.shape[0], self.patch_size, self.grid_size, self.in_channels
        return x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)

    def forward(self, z: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        expected = (self.in_channels, self.sample_size, self.sample_size)
        if z.ndim != 4 or tuple(z.shape[1:]) != expected:
            shape = ", ".join(map(str, expected))
            raise ValueError(f"DiT expects input of shape (B, {shape}), got {tuple(z.shape)}")
        x = self.x_embedder(z).flatten(2).transpose(1, 2) + self.pos_embed.to(z.dtype)  # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(labels)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))

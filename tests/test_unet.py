import pytest
import torch
from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D, DownBlock2D

from networks import ClassConditionalUNet

TINY = dict(
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    cross_attention_resolution=4,
    cross_attention_dim=32,
    attention_heads=2,
    norm_num_groups=8,
)


def test_shape_and_class_conditioning():
    torch.manual_seed(0)
    model = ClassConditionalUNet(3, 12, 16, **TINY)
    z, t = torch.randn(2, 12, 16, 16), torch.rand(2)
    out = {label: model(z, t, torch.full((2,), label)) for label in range(4)}  # label 3 = null
    assert out[0].shape == z.shape
    # a fresh diffusers UNet zero-initialises its output conv; perturb it so outputs carry signal
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.1)
    out = {label: model(z, t, torch.full((2,), label)) for label in range(4)}
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.allclose(out[a], out[b]), f"labels {a} and {b} give the same output"
    torch.testing.assert_close(model(z, t, torch.zeros(2, dtype=torch.long)), out[0])  # deterministic


def test_cross_attention_only_at_and_below_the_configured_resolution():
    # levels work at 16, 8, 4 pixels: with 4, only the last level (and the middle) attend
    model = ClassConditionalUNet(2, 12, 16, **TINY)
    kinds = [type(block) for block in model.unet.down_blocks]
    assert kinds == [DownBlock2D, DownBlock2D, CrossAttnDownBlock2D]
    model = ClassConditionalUNet(2, 12, 16, **{**TINY, "cross_attention_resolution": 8})
    assert [type(block) for block in model.unet.down_blocks] == [
        DownBlock2D,
        CrossAttnDownBlock2D,
        CrossAttnDownBlock2D,
    ]


def test_attention_heads_is_the_number_of_heads():
    model = ClassConditionalUNet(2, 12, 16, **{**TINY, "attention_heads": 4})
    attention = model.unet.mid_block.attentions[0].transformer_blocks[0].attn2
    assert attention.heads == 4


def test_time_matters():
    torch.manual_seed(0)
    model = ClassConditionalUNet(2, 12, 16, **TINY)
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.1)
    z, labels = torch.randn(1, 12, 16, 16), torch.tensor([1])
    assert not torch.allclose(model(z, torch.tensor([0.1]), labels), model(z, torch.tensor([0.9]), labels))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(cross_attention_resolution=2), "cross_attention_resolution"),
        (dict(norm_num_groups=12), "norm_num_groups"),
    ],
)
def test_bad_options_name_themselves(options, message):
    with pytest.raises(ValueError, match=message):
        ClassConditionalUNet(2, 12, 16, **{**TINY, **options})


def test_sample_size_must_survive_the_downsampling():
    with pytest.raises(ValueError, match="sample_size"):
        ClassConditionalUNet(2, 12, 18, **TINY)

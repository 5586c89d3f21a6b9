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


@pytest.mark.parametrize("conditioning", ["time_embedding", "both"])
def test_the_class_can_enter_through_the_time_embedding_with_its_null_label(conditioning):
    torch.manual_seed(0)
    model = ClassConditionalUNet(2, 12, 16, **TINY, conditioning=conditioning)
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.1)
    assert model.unet.class_embedding.num_embeddings == 3  # 2 classes + the null label of guidance
    z, t = torch.randn(2, 12, 16, 16), torch.rand(2)
    out = [model(z, t, torch.full((2,), label)) for label in range(3)]
    assert all(not torch.allclose(out[a], out[b]) for a in range(3) for b in range(a + 1, 3))
    attending = [type(block) for block in model.unet.down_blocks].count(CrossAttnDownBlock2D)
    if conditioning == "time_embedding":  # no cross-attention anywhere: the embedding is the only way in
        assert attending == 0 and model.class_encoder is None
        assert not any("attn2" in name for name, _ in model.named_modules())
        # the class changes the output only through the embedding table
        with torch.no_grad():
            model.unet.class_embedding.weight[1] = model.unet.class_embedding.weight[0]
        torch.testing.assert_close(model(z, t, torch.ones(2, dtype=torch.long)), out[0])
    else:
        assert attending == 1 and model.class_encoder is not None


def test_cross_attention_stays_the_default_and_has_no_class_embedding():
    model = ClassConditionalUNet(2, 12, 16, **TINY)
    assert model.conditioning == "cross_attention" and model.unet.class_embedding is None
    with pytest.raises(ValueError, match="conditioning='adain' is not one of"):
        ClassConditionalUNet(2, 12, 16, **TINY, conditioning="adain")

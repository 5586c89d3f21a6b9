"""The paper's discriminative baselines by name (sec. 3.2, Appendix B.2): ResNet-18/50 from
torchvision; EfficientNet-B0/B4, ViT-S/16, ViT-B/16 and Swin-B from timm.

    network = build_backbone("vit_s16", num_classes=2, image_size=256)   # (B, 3, 256, 256) -> logits (B, 2)

Every model is the library's own implementation, built for the data's number of classes, input
channels and, where the architecture depends on it, image size (timm's `img_size`: the ViT
position embeddings and Swin's attention masks). Weights start random; pretrained weights come
only from a local file or folder (`pretrained_path`), never from a hub, so runs are reproducible
offline. Swin-B keeps its window of 7 at 256x256 (timm pads the 64x64 token grid to windows).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torchvision
from lightning.pytorch.utilities import rank_zero_info
from timm.models import adapt_input_conv
from torch import nn

from .weights import load_weights_file


@dataclass(frozen=True)
class BackboneSpec:
    library: str  # "torchvision" or "timm"
    arch: str  # the library's model name
    display_name: str  # as in the paper's Table 1
    group: str  # Table 1's group: CNN or TF
    takes_img_size: bool = False  # timm models whose parameters or buffers depend on the input size


BACKBONES = {
    "resnet18": BackboneSpec("torchvision", "resnet18", "ResNet-18", "CNN"),
    "resnet50": BackboneSpec("torchvision", "resnet50", "ResNet-50", "CNN"),
    "efficientnet_b0": BackboneSpec("timm", "efficientnet_b0", "EfficientNet-B0", "CNN"),
    "efficientnet_b4": BackboneSpec("timm", "efficientnet_b4", "EfficientNet-B4", "CNN"),
    "vit_s16": BackboneSpec("timm", "vit_small_patch16_224", "ViT-S/16", "TF", takes_img_size=True),
    "vit_b16": BackboneSpec("timm", "vit_base_patch16_224", "ViT-B/16", "TF", takes_img_size=True),
    "swin_b": BackboneSpec("timm", "swin_base_patch4_window7_224", "Swin-B", "TF", takes_img_size=True),
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def backbone_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def build_backbone(
    name: str,
    num_classes: int,
    image_size: int = 256,
    in_channels: int = 3,
    pretrained_path: str | None = None,
    drop_rate: float = 0.0,
) -> nn.Module:
    """The backbone `name` (a key of BACKBONES) as an image -> logits model.

    pretrained_path: a weights file (.safetensors, .pth, .pt, .bin, a Lightning .ckpt) or a folder
        holding one (e.g. a downloaded Hugging Face snapshot); a classifier head of another size is
        replaced by a new random one, everything else must match.
    drop_rate: dropout before the classification head, the same for every backbone (0 = none, as in
        the official implementations); needed for MC-dropout uncertainty.
    """
    spec = backbone_spec(name)
    model = _create(spec, num_classes, image_size, in_channels)
    if pretrained_path:
        load_pretrained(model, pretrained_path, spec, in_channels)
    if drop_rate > 0:
        # torchvision's ResNets have no dropout, and timm's EfficientNet uses a functional one that
        # only model.train() switches on (BatchNorm too): a dropout module on the head's input
        # gives every backbone the same dropout, switchable on its own for MC dropout.
        parent, _, attribute = _head_names(model, spec)[0].rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, attribute, DropoutLinear(getattr(owner, attribute), drop_rate))
    return model


class DropoutLinear(nn.Linear):
    """A linear layer with dropout on its input. Its state_dict keys are those of the nn.Linear it
    replaces, so checkpoints load whatever the drop_rate they were trained with."""

    def __init__(self, linear: nn.Linear, p: float):
        super().__init__(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        self.load_state_dict(linear.state_dict())
        self.dropout = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.dropout(x))


def _create(spec: BackboneSpec, num_classes: int, image_size: int, in_channels: int) -> nn.Module:
    if spec.library == "torchvision":
        model = getattr(torchvision.models, spec.arch)(weights=None, num_classes=num_classes)
        if in_channels != 3:
            old = model.conv1
            model.conv1 = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        return model
    size = {"img_size": image_size} if spec.takes_img_size else {}
    # pretrained=False: timm would otherwise fetch weights from the Hugging Face hub.
    return timm.create_model(spec.arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **size)


def _head_names(model: nn.Module, spec: BackboneSpec) -> tuple[str, ...]:
    if spec.library == "torchvision":
        return ("fc",)
    classifier = model.pretrained_cfg["classifier"]
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def _first_conv(model: nn.Module, spec: BackboneSpec) -> str:
    return "conv1" if spec.library == "torchvision" else model.pretrained_cfg["first_conv"]


def weights_file(path: str | Path) -> Path:
    """The weights file `path` names, or the one weights file in the folder `path`."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(
            f"pretrained_path {str(path)!r} does not exist (weights are only read from local files)"
        )
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    candidates = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if len(candidates) != 1:
        raise FileNotFoundError(
            f"pretrained_path {str(path)!r}: expected one weights file ({', '.join(WEIGHT_FILES)} or one "
            f"*{'/*'.join(WEIGHT_SUFFIXES)}), found {[p.name for p in candidates]}"
        )
    return candidates[0]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: timm's reader (safetensors or torch; unwraps `state_dict`/`model`
    nesting and `module.` prefixes), plus the `network.` prefix of this suite's Lightning checkpoints."""
    if Path(path).suffix != ".safetensors":
        load_weights_file(path)  # refuses a file that needs arbitrary unpickling, naming it
    state = timm.models.load_state_dict(str(path), use_ema=True, weights_only=True)
    if state and all(key.startswith("network.") for key in state):
        state = {key[len("network.") :]: value for key, value in state.items()}
    return state


def load_pretrained(model: nn.Module, path: str | Path, spec: BackboneSpec, in_channels: int = 3) -> None:
    """Loads local weights into `model`, refusing any mismatch except the classifier head's size."""
    file = weights_file(path)
    try:
        state = read_state_dict(file)
    except Exception as error:  # a corrupt or foreign file: say which one
        raise ValueError(f"cannot read weights from pretrained_path {str(file)!r}: {error}") from error
    # timm keeps each architecture's checkpoint adapter beside it (the one its own pretrained
    # loading applies): it resamples ViT position embeddings from 224 to 256 and converts the
    # original Swin / ViT releases to timm's layout.
    adapt = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if spec.library == "timm" and adapt is not None:
        state = adapt(state, model)
    conv = _first_conv(model, spec) + ".weight"
    if conv in state and state[conv].ndim == 4 and state[conv].shape[1] != in_channels:
        state[conv] = adapt_input_conv(in_channels, state[conv])  # e.g. RGB weights for grey images
    heads = _head_names(model, spec)
    is_head = lambda key: any(key.startswith(head + ".") for head in heads)  # noqa: E731
    own = model.state_dict()
    dropped = [k for k in state if is_head(k) and k in own and state[k].shape != own[k].shape]
    for key in dropped:
        del state[key]
    if dropped:
        rank_zero_info(f"{file}: new random {own[dropped[0]].shape[0]}-class head for {spec.display_name}")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(
            f"pretrained_path {str(file)!r} does not fit {spec.display_name} ({spec.arch}): {error}"
        ) from error
    missing = [k for k in missing if k not in dropped]
    if missing or unexpected:
        raise ValueError(
            f"pretrained_path {str(file)!r} does not fit {spec.display_name} ({spec.arch}): "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
        )

"""Speed switches: bf16-mixed in the GPU paper configs and nowhere on the CPU; CompileNetwork and
ChannelsLast switched on for a tiny CPU run (and off on the CPU unless asked), checkpoints unchanged."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from cli import main
from lightning_modules.callbacks import ChannelsLast, CompileNetwork
from tests.helpers.configs import EXPERIMENTS, resolved
from tests.helpers.runs import tiny_args

CPU_CONFIGS = ["demo", "baseline_demo", "unet_pneumoniamnist", "resnet18_pneumoniamnist"]
BACKBONES = ["resnet18", "resnet50", "efficientnet_b0", "efficientnet_b4", "vit_s16", "vit_b16", "swin_b"]
CNNS = {"unet", "resnet18", "resnet50", "efficientnet_b0", "efficientnet_b4"}
GPU_PAPER_CONFIGS = [f"{model}_{data}" for model in ["unet", "dit", *BACKBONES] for data in ("chexpert", "isic")]
COMPILE, CHANNELS_LAST = "lightning_modules.callbacks.CompileNetwork", "lightning_modules.callbacks.ChannelsLast"


def callback_paths(config: dict) -> list[str]:
    return [callback["class_path"] for callback in config["trainer"].get("callbacks") or []]


def test_the_cpu_configs_are_the_ones_on_the_cpu():
    assert [name for name in EXPERIMENTS if resolved(name)["trainer"]["accelerator"] == "cpu"] == sorted(CPU_CONFIGS)


@pytest.mark.parametrize("name", CPU_CONFIGS)
def test_cpu_configs_switch_no_precision_or_speed_option_on(name):
    trainer = resolved(name)["trainer"]
    assert trainer.get("precision") in (None, "32-true", 32, "32")
    assert not {COMPILE, CHANNELS_LAST} & set(callback_paths(resolved(name)))


@pytest.mark.parametrize("name", GPU_PAPER_CONFIGS)
def test_gpu_paper_configs_use_bf16_and_channels_last_for_cnns(name):
    config = resolved(name)
    assert config["trainer"]["precision"] == "bf16-mixed"
    assert (CHANNELS_LAST in callback_paths(config)) == (name.rsplit("_", 1)[0] in CNNS)
    assert COMPILE not in callback_paths(config)  # opt-in (compile time), see the configs' comment


class ConvInputFormat(Callback):
    """Records whether the network's first convolution receives channels-last inputs in training."""

    def on_train_start(self, trainer, pl_module):
        self.channels_last = []
        first_conv = next(m for m in pl_module.network.modules() if isinstance(m, torch.nn.Conv2d))
        first_conv.register_forward_pre_hook(
            lambda module, args: self.channels_last.append(args[0].is_contiguous(memory_format=torch.channels_last))
        )


def conv_weights(model) -> list[torch.Tensor]:
    return [m.weight for m in model.network.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]


def test_speed_switches_stay_off_on_cpu_unless_asked(tmp_path):
    cli = main(
        [
            "fit",
            *tiny_args(
                tmp_path,
                "--trainer.max_steps=1",
                f"--trainer.callbacks+={CHANNELS_LAST}",
                f"--trainer.callbacks+={COMPILE}",
            ),
        ]
    )
    assert {ChannelsLast, CompileNetwork} <= {type(c) for c in cli.trainer.callbacks}
    assert getattr(cli.model.network, "_compiled_call_impl", None) is None
    assert not any(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(cli.model))


def fit_on_cpu_with(tmp_path, switch: str, *options: str):
    """Two training steps of the tiny demo with the speed switch `switch` on although on the CPU."""
    args = tiny_args(
        tmp_path, "--trainer.max_steps=2", f"--trainer.callbacks+={switch}", "--trainer.callbacks.on_cpu=true"
    )
    return main(["fit", *args, *options])


def test_channels_last_switched_on_for_a_cpu_run(tmp_path, tiny_checkpoint):
    cli = fit_on_cpu_with(tmp_path, CHANNELS_LAST, "--trainer.callbacks+=tests.test_speed_switches.ConvInputFormat")
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(cli.model))
    recorder = next(c for c in cli.trainer.callbacks if type(c).__name__ == "ConvInputFormat")
    assert len(recorder.channels_last) == 2 and all(recorder.channels_last)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    plain = torch.load(tiny_checkpoint, weights_only=False)["state_dict"]
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in plain.items()}


def test_compile_switched_on_for_a_cpu_run(tmp_path, tiny_checkpoint):
    # backend "eager": TorchDynamo captures the graphs without code generation (inductor's C++
    # build of even this tiny UNet takes minutes on 2 shared cores; see the slow test below)
    from torch._dynamo.utils import counters

    counters.clear()
    cli = fit_on_cpu_with(tmp_path, COMPILE, "--trainer.callbacks.backend=eager")
    assert getattr(cli.model.network, "_compiled_call_impl", None) is not None
    assert counters["stats"]["unique_graphs"] >= 1  # compiled lazily, at the first forward
    # compiled in place: the same state_dict keys as an uncompiled run, so checkpoints mix freely
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert saved.keys() == torch.load(tiny_checkpoint, weights_only=False)["state_dict"].keys()


@pytest.mark.slow
def test_compile_with_inductor_trains_and_matches_eager(tmp_path):
    losses = {}
    for name, extra in [
        ("eager", []),
        ("inductor", [f"--trainer.callbacks+={COMPILE}", "--trainer.callbacks.on_cpu=true"]),
    ]:
        cli = main(
            ["fit", *tiny_args(tmp_path / name, "--trainer.max_steps=2", "--trainer.deterministic=true", *extra)]
        )
        losses[name] = float(cli.trainer.callback_metrics["train/loss"])
    assert losses["inductor"] == pytest.approx(losses["eager"], rel=1e-3)

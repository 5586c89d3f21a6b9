"""Speed switches a GPU config may list under `trainer.callbacks`: CompileNetwork (torch.compile in place)
and ChannelsLast (NHWC convolutions); both leave a CPU run alone unless asked."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn


def _runs_on_cpu(trainer) -> bool:
    return trainer.strategy.root_device.type == "cpu"


class CompileNetwork(Callback):
    """Compiles the model's network with `torch.compile`, in place (`nn.Module.compile`).

    In place means the module is not wrapped: parameter names, state_dict keys and checkpoints are
    those of an uncompiled run, so checkpoints move freely between compiled and plain runs. The
    compilation itself happens lazily, at the first forward of each new input shape; the
    diffusion classifier's classification forwards (C x B images) have other shapes than its
    training ones, so expect a recompilation when validation first runs (`dynamic` decides
    whether later shapes share one graph).

        trainer:
          callbacks:
            - class_path: lightning_modules.callbacks.CompileNetwork
              init_args: {mode: max-autotune-no-cudagraphs}

    or `--trainer.callbacks+=lightning_modules.callbacks.CompileNetwork` on the command line.

    Args:
        attribute: the LightningModule attribute holding the network (both classifiers: network).
        mode: torch.compile mode (null = "default"; "reduce-overhead", "max-autotune",
            "max-autotune-no-cudagraphs").
        backend: torch.compile backend ("inductor"; "eager" only traces, for tests).
        fullgraph: fail on graph breaks instead of falling back to Python between graphs.
        dynamic: compile for dynamic shapes (null = after the first shape change).
        on_cpu: also compile when running on the CPU. Off by default: there the compile time
            (tens of seconds to minutes) exceeds what a CPU run gains, so a GPU config that lists
            this callback still runs unchanged, uncompiled, on a CPU.
    """

    def __init__(
        self,
        attribute: str = "network",
        mode: str | None = None,
        backend: str = "inductor",
        fullgraph: bool = False,
        dynamic: bool | None = None,
        on_cpu: bool = False,
    ):
        self.attribute, self.on_cpu = attribute, on_cpu
        self.options = {"mode": mode, "backend": backend, "fullgraph": fullgraph, "dynamic": dynamic}
        self._compiled: set[int] = set()

    def setup(self, trainer, pl_module, stage: str) -> None:
        if _runs_on_cpu(trainer) and not self.on_cpu:
            rank_zero_info("CompileNetwork: not compiling on the CPU (on_cpu=false)")
            return
        network: nn.Module = getattr(pl_module, self.attribute)
        if id(network) not in self._compiled:  # setup runs per stage: once is enough
            network.compile(**self.options)
            self._compiled.add(id(network))
            rank_zero_info(f"CompileNetwork: {type(network).__name__} compiled lazily with {self.options}")


class ChannelsLast(Callback):
    """Runs the model's network in the channels-last memory format (NHWC), for CNNs on GPUs.

    Tensor cores convolve NHWC directly; with NCHW tensors cuDNN transposes around convolutions.
    PyTorch's channels-last tutorial reports speed-ups for CNNs under mixed precision (ResNets,
    EfficientNets, UNets); ViT and Swin have one convolution (the patch embedding) and gain
    nothing. Measure on your GPU: not measured here (CPU-only machines). The network's 4-D
    weights are converted in setup, and a forward pre-hook converts every 4-D tensor the network
    receives (after the model's own transforms such as the Haar wavelet), so the batch itself is
    untouched. Parameters keep their identity and names (only their memory layout changes), so
    optimizers, the EMA callback and checkpoints work unchanged; checkpoints load either way.

        trainer:
          callbacks:
            - class_path: lightning_modules.callbacks.ChannelsLast

    Args:
        attribute: the LightningModule attribute holding the network (both classifiers: network).
        on_cpu: also convert when running on the CPU. Off by default, as for CompileNetwork: the
            GPU configs that list this callback run unchanged on a CPU.
    """

    def __init__(self, attribute: str = "network", on_cpu: bool = False):
        self.attribute, self.on_cpu = attribute, on_cpu
        self._hook = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if _runs_on_cpu(trainer) and not self.on_cpu:
            rank_zero_info("ChannelsLast: keeping the default memory format on the CPU (on_cpu=false)")
            return
        if self._hook is not None:  # setup runs per stage: convert once
            return
        network: nn.Module = getattr(pl_module, self.attribute)
        network.to(memory_format=torch.channels_last)
        self._hook = network.register_forward_pre_hook(_inputs_to_channels_last, with_kwargs=True)
        rank_zero_info(f"ChannelsLast: {type(network).__name__} runs in channels-last memory format")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _to_channels_last(value):
    if isinstance(value, Tensor) and value.dim() == 4 and value.is_floating_point():
        return value.contiguous(memory_format=torch.channels_last)
    return value


def _inputs_to_channels_last(module, args, kwargs):
    return tuple(map(_to_channels_last, args)), {key: _to_channels_last(value) for key, value in kwargs.items()}

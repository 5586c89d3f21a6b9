"""`make gpu-check`'s script (tools/gpu_check.py) as it runs, at tiny sizes, and torch.compile through the engine's
loop: the GPU path proven on the CPU (issue 39). Autocast against fp32: tests/test_gpu_path.py."""

import json

import pytest
import torch
from torch import nn

from diffusion.engine import ClassifierSettings, classify_images
from diffusion.schedule import ShiftedCosineSchedule
from tools import gpu_check


def step_winners(errors: torch.Tensor) -> torch.Tensor:
    return errors.argmin(dim=1)  # (B, N): the class each step votes for


def compiled_errors(network, x, schedule, backend: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The engine's errors with the plain and the compiled network (fullgraph: a graph break is an error), and
    dynamo's counters of the compiled run. 4 images x 8 steps x 2 classes in forwards of 16: one input shape."""
    from torch._dynamo.utils import counters

    settings = ClassifierSettings(num_steps=8, max_forward_batch=16)
    ids = torch.arange(len(x))
    with torch.no_grad():
        plain = classify_images(network, x, ids, 2, schedule, settings)["errors"]
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(network, backend=backend, fullgraph=True, dynamic=False)
        again = classify_images(compiled, x, ids, 2, schedule, settings)["errors"]
    return plain, again, {key: dict(value) for key, value in counters.items()}


def networks_under_test():
    """A small UNet (diffusers' blocks, cross-attention) and DiT, their zero-initialised layers drawn, on 4 inputs."""
    torch.manual_seed(0)
    unet = gpu_check.build("UNet", gpu_check.DRY_INPUT, gpu_check.DRY_OPTIONS["UNet"])
    x = torch.randn(4, *gpu_check.DRY_INPUT, generator=torch.Generator().manual_seed(0))
    schedule = ShiftedCosineSchedule(gpu_check.DRY_INPUT[-1])
    return {
        "UNet": (unet, x, schedule),
        "DiT": (gpu_check.build("DiT-B/4", gpu_check.DRY_INPUT, gpu_check.DRY_OPTIONS["DiT-B/4"]), x, schedule),
    }


@pytest.mark.parametrize("name", ["UNet", "DiT"])
def test_compiled_networks_give_the_engines_errors_with_no_graph_break(name, one_thread):
    """torch.compile of the network, fullgraph, through the engine's loop: one graph, no break, the same errors.
    Backend aot_eager: dynamo's capture and AOTAutograd's tracing without inductor's C++ build (minutes here; the
    inductor test below is marked slow)."""
    network, x, schedule = networks_under_test()[name]
    plain, compiled, counters = compiled_errors(network, x, schedule, "aot_eager")
    assert not counters.get("graph_break")
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(compiled, plain, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["UNet", "DiT"])
def test_inductor_compiled_networks_give_the_engines_errors(name):
    network, x, schedule = networks_under_test()[name]
    plain, compiled, counters = compiled_errors(network, x, schedule, "inductor")
    assert not counters.get("graph_break")
    torch.testing.assert_close(compiled, plain, rtol=1e-3, atol=1e-6)
    assert torch.equal(step_winners(compiled), step_winners(plain)) or (
        float((step_winners(compiled) == step_winners(plain)).float().mean()) >= 0.99
    )


class OneLinear(nn.Module):
    """A denoiser of one linear map on the flattened input: 2 x 48 x 48 FLOPs per input in closed form."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(48, 48, bias=False)

    def forward(self, z, t, labels):
        return self.linear(z.flatten(1)).view_as(z)


def test_flops_per_input_match_the_closed_form_of_a_linear_map():
    assert gpu_check.flops_per_input(OneLinear(), (12, 2, 2)) == 2 * 48 * 48
    with torch.device("meta"):  # the meta device, as gpu_check counts the paper sizes: the same count
        assert gpu_check.flops_per_input(OneLinear(), (12, 2, 2)) == 2 * 48 * 48


def test_roofline_is_compute_bound_for_big_forwards_and_weight_bound_for_tiny_ones():
    h100, h200 = gpu_check.CARDS["H100"], gpu_check.CARDS["H200"]
    heavy = gpu_check.roofline_seconds_per_image(flops=10**12, parameters=10**6, steps=501, forward_batch=256)
    assert heavy["H100"] == pytest.approx(2 * 501 * 1e12 / h100["bf16_flops"]) == pytest.approx(heavy["H200"])
    light = gpu_check.roofline_seconds_per_image(flops=10**3, parameters=10**9, steps=501, forward_batch=2)
    assert light["H200"] == pytest.approx(501 * 2e9 / h200["bandwidth"])
    assert light["H100"] / light["H200"] == pytest.approx(h200["bandwidth"] / h100["bandwidth"])


def test_the_peak_memory_estimate_holds_the_weights_and_the_forwards_inputs_and_grows_with_the_batch():
    shape, options = gpu_check.DRY_INPUT, gpu_check.DRY_OPTIONS["DiT-B/4"]
    weights = sum(p.nbytes for p in gpu_check.build("DiT-B/4", shape, options).parameters())
    values = shape[0] * shape[1] * shape[2]
    peaks = [gpu_check.peak_memory("DiT-B/4", shape, options, torch.device("cpu"), batch)["bytes"] for batch in (2, 64)]
    # at least the weights, the forward's input (64 x the model input, fp32 and its bf16 copy) and its output
    assert peaks[1] >= weights + 64 * values * (4 + 2 + 2)
    assert weights < peaks[0] < peaks[1]


def test_gpu_check_dry_run_writes_every_number(tmp_path, one_thread):
    """`make gpu-check` as a GPU runs it, at tiny sizes on the CPU: the same code, every number written."""
    output = tmp_path / "gpu_check.json"
    gpu_check.main(["--dry", "--device", "cpu", "--output", str(output)])
    result = json.loads(output.read_text())
    assert result["dry"] and result["bf16"] and set(result["networks"]) == {"UNet", "DiT-B/4"}
    for row in result["networks"].values():
        assert row["flops_per_input"] > 0 and row["peak_memory"]["bytes"] > 4 * row["parameters"]
        assert set(row["roofline_s_per_image_n501"]) == {"H100", "H200"}
        assert row["exit_off"]["forward_fraction"] == 1.0 and row["exit_off"]["s_per_image"] > 0
        assert 0 < row["exit_sequential"]["forward_fraction"] <= 1.0
        assert 0 <= row["exit_sequential"]["agreement_with_full_n"] <= 1.0


def test_gpu_check_without_a_gpu_asks_for_the_dry_run(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cpu"])
    assert "--dry" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["UNet", "DiT-B/4"])
def test_the_paper_size_networks_run_one_engine_segment_at_the_papers_input(name):
    """The paper-size UNet and DiT-B/4 (random weights) through the engine's segment at 12 x 128 x 128, both
    classes of one image in one forward, for real on the CPU."""
    options = gpu_check.network_options(name, dry=False)
    network = gpu_check.build(name, gpu_check.PAPER_INPUT, options)
    with torch.no_grad():
        errors = gpu_check.one_segment(network, torch.randn(1, *gpu_check.PAPER_INPUT))
    assert errors.shape == (1, 2, 1) and bool(torch.isfinite(errors).all())
    assert float(errors[0, 0, 0]) != float(errors[0, 1, 0])  # the class reaches the output

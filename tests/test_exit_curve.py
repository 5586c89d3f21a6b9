"""tools.exit_curve: the exit replayed on full errors is the engine's exit, step for step; the plan's order and
its band ranking by hand; the goal point; the whole tool on a tiny checkpoint."""

import json

import torch

from diffusion.engine import ClassifierSettings, classify_images
from diffusion.schedule import ShiftedCosineSchedule
from diffusion.voting import summarize
from tools import exit_curve


def class_dependent_denoiser(z, t, labels):
    """A stand-in network whose classes differ image by image: each image leans to a class by its own mean."""
    lean = z.mean(dim=(1, 2, 3), keepdim=True).tanh()
    return z * (0.9 + 0.2 * labels.view(-1, 1, 1, 1) * lean)


def test_the_replayed_exit_is_the_engines_exit():
    x = torch.randn(24, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ids, schedule = torch.arange(24), ShiftedCosineSchedule(8)
    full = ClassifierSettings(num_steps=60, max_forward_batch=64)
    exiting = ClassifierSettings(num_steps=60, max_forward_batch=64, early_exit="sequential", alpha=0.05,
                                 min_steps=5, check_every=5)  # fmt: skip
    errors = classify_images(class_dependent_denoiser, x, ids, 2, schedule, full)["errors"]
    engine = classify_images(class_dependent_denoiser, x, ids, 2, schedule, exiting)
    replayed = exit_curve.replayed_exit(errors, torch.arange(60).expand(24, 60), exiting)
    assert torch.equal(replayed["forwards"], engine["forwards"])
    assert torch.equal(replayed["prediction"], summarize(engine["errors"])["prediction"])
    assert (engine["forwards"] < 120).any() and (engine["forwards"] == 120).any()  # images stop early, some run on


def test_the_plan_puts_the_ranked_bands_first_and_keeps_the_drawn_order_within_a_band():
    times = torch.tensor([[0.05, 0.95, 0.55, 0.91, 0.50]])
    order = exit_curve.planned_order(times, ranking=[9, 5, 0, 1, 2, 3, 4, 6, 7, 8], bands=10)
    assert order.tolist() == [[1, 3, 2, 4, 0]]


def test_the_band_ranking_puts_the_band_that_votes_right_first():
    labels = torch.tensor([0, 1, 0, 1])
    times = torch.tensor([[0.1, 0.1, 0.9, 0.9]]).expand(4, 4)
    errors = torch.ones(4, 2, 4)
    rows = torch.arange(4)
    errors[rows, labels, 2:] = 0.5  # t = 0.9: the true class always wins
    errors[rows[:2], labels[:2], :2] = 0.5  # t = 0.1: half the images' votes right
    errors[rows[2:], 1 - labels[2:], :2] = 0.5
    assert exit_curve.band_ranking(errors, times, labels, bands=2) == [1, 0]


def test_the_goal_point_is_the_fewest_forwards_that_keep_agreement_and_accuracy():
    rows = [
        {"alpha": 0.2, "forward_fraction": 0.02, "agreement": 0.95, "accuracy": 0.90},
        {"alpha": 0.05, "forward_fraction": 0.04, "agreement": 0.99, "accuracy": 0.84},
        {"alpha": 0.01, "forward_fraction": 0.06, "agreement": 0.995, "accuracy": 0.85},
        {"alpha": 0.001, "forward_fraction": 0.09, "agreement": 1.0, "accuracy": 0.86},
    ]
    assert exit_curve.goal_point(rows, full_accuracy=0.85)["alpha"] == 0.01
    assert exit_curve.goal_point(rows, full_accuracy=0.99) is None


def test_the_tool_writes_the_curve_for_both_orders_on_both_splits(tiny_checkpoint, tmp_path, one_thread):
    options = ["--steps", "20", "--bands", "2", "--images", "6", "--output-dir", str(tmp_path)]
    result = exit_curve.main([str(tiny_checkpoint), *options])
    written = json.loads((tmp_path / "exit_curve.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert (tmp_path / "exit_curve.png").stat().st_size > 0 and "plan" in (tmp_path / "exit_curve.md").read_text()
    for part in written["splits"].values():
        assert part["images"] == 6  # of the tiny demo's 8 per split, drawn
        for name in exit_curve.ORDERS:
            rows = part["curves"][name]
            assert [row["alpha"] for row in rows] == list(exit_curve.ALPHAS)
            assert all(0 < row["forward_fraction"] <= 1 for row in rows)
            # a stricter alpha never stops sooner
            assert all(a["forward_fraction"] <= b["forward_fraction"] for a, b in zip(rows, rows[1:]))

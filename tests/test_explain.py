"""Counterfactual explanations: difference-map conventions, faithfulness and localisation numbers
computed by hand, several noise draws, the border, reproducibility, and the
`predict --model.init_args.explain true` command end to end."""

import functools
import json

import numpy as np
import pytest
import torch

from cli import main
from diffusion.explain import (
    ExplainSettings,
    concentration,
    difference_maps,
    distances,
    explain_batch,
    finish_maps,
    gaussian_blur,
    is_grayscale,
    localisation,
    mean_difference_maps,
    signed_for,
)
from diffusion.noise import EXPLANATION_STEP, normals, pair_keys
from diffusion.sampler import ddim_sample, noise_to
from diffusion.schedule import ShiftedCosineSchedule
from diffusion.wavelet import HaarWavelet
from reports.explanations import explanation_rows, faithfulness, plot_explanations
from tests.helpers import runs
from tests.helpers.models import LabelledLinear, flip_rate_of
from tests.helpers.runs import TEST_IDS
from tools.summary import explanation_summary


def test_signed_map_is_counterfactual_minus_factual_averaged_over_channels():
    factual = torch.zeros(1, 3, 2, 2)
    counterfactual = torch.zeros(1, 3, 2, 2)
    counterfactual[0, :, 0, 0] = 0.5  # brighter at the top left
    counterfactual[0, :, 1, 1] = -0.25  # darker at the bottom right
    reconstructions = torch.stack([factual, counterfactual], dim=1)  # classes 0 and 1
    maps = difference_maps(reconstructions, factual=torch.tensor([0]), signed=torch.tensor([True]))
    assert torch.equal(maps[0, 0], torch.zeros(2, 2))  # the factual class's own map
    torch.testing.assert_close(maps[0, 1], torch.tensor([[0.5, 0.0], [0.0, -0.25]]))


def test_absolute_map_sums_channel_magnitudes_for_colour_images():
    factual = torch.zeros(1, 3, 1, 2)
    counterfactual = torch.tensor([[[[0.2, 0.0]], [[-0.3, 0.0]], [[0.1, -0.4]]]])
    reconstructions = torch.stack([counterfactual, factual], dim=1)  # factual class is 1 here
    maps = difference_maps(reconstructions, factual=torch.tensor([1]), signed=torch.tensor([False]))
    torch.testing.assert_close(maps[0, 0], torch.tensor([[0.6, 0.4]]))
    assert torch.equal(maps[0, 1], torch.zeros(1, 2))


def test_auto_mode_signs_grayscale_images_only():
    grey = torch.rand(1, 1, 4, 4).expand(1, 3, 4, 4)
    colour = torch.rand(1, 3, 4, 4)
    single_channel = torch.rand(1, 1, 4, 4)
    images = torch.cat([grey, colour])
    assert is_grayscale(images).tolist() == [True, False] and is_grayscale(single_channel).tolist() == [True]
    assert signed_for(images, "auto").tolist() == [True, False]
    assert signed_for(images, "absolute").tolist() == [False, False]
    assert signed_for(images, "signed").tolist() == [True, True]


def test_concentration_and_distances_by_hand():
    maps = torch.tensor([[[[4.0, -3.0], [0.1, 0.2]]]])  # top 50 % by magnitude: the 4 and the -3
    change = torch.tensor([[[[1.0, 3.0], [0.5, 0.5]]]])
    inside, outside = concentration(change, maps, top_fraction=0.5)
    assert inside.item() == pytest.approx(2.0) and outside.item() == pytest.approx(0.5)
    images = torch.zeros(1, 1, 2, 2)
    reconstructions = torch.tensor([[[[[1.0, -1.0], [0.0, 0.0]]]]])  # (B=1, C=1 class, 1, 2, 2)
    l1, l2 = distances(images, reconstructions)
    assert l1.item() == pytest.approx(0.5) and l2.item() == pytest.approx(np.sqrt(0.5))


def test_faithfulness_numbers_by_hand():
    rows = {  # two images, three classes; factual classes 0 and 2
        "factual": torch.tensor([0, 2]),
        "flip": torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]]),
        "l1": torch.tensor([[0.1, 0.3, 0.5], [0.2, 0.4, 0.05]]),
        "l2": torch.tensor([[0.1, 0.3, 0.05], [0.2, 0.4, 0.1]]),
        "inside": torch.tensor([[0.0, 2.0, 4.0], [1.0, 1.0, 0.0]]),
        "outside": torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.5, 0.0]]),
    }
    numbers = faithfulness(rows, ["a", "b", "c"])
    assert numbers["n_images"] == 2 and numbers["n_counterfactuals"] == 4
    assert numbers["flip_rate"] == pytest.approx(2 / 4)  # (1, 0) for image 0, (1, 0) for image 1
    assert numbers["factual_kept_rate"] == pytest.approx(1.0)
    assert numbers["flip_rate_by_target"] == {"a": 1.0, "b": 0.5, "c": 0.0}
    assert numbers["l1_input_factual"] == pytest.approx((0.1 + 0.05) / 2)
    assert numbers["l2_input_counterfactual"] == pytest.approx((0.3 + 0.05 + 0.2 + 0.4) / 4)
    assert numbers["factual_closer_rate"] == pytest.approx(3 / 4)  # image 0 vs class c: 0.05 < 0.1
    assert numbers["concentration_ratio"] == pytest.approx((2 + 4 + 1 + 2) / 4)


def tiny_explainer():
    """An untrained 1x1-conv denoiser on the wavelet of two random 16x16 colour images: (model, wavelet,
    schedule, images, ids, factual), the same numbers at every call."""
    torch.manual_seed(0)
    model, wavelet, schedule = LabelledLinear(channels=12), HaarWavelet(), ShiftedCosineSchedule(8)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    return model, wavelet, schedule, images, torch.tensor([5, 9]), torch.tensor([1, 0])


def test_t0_zero_explains_with_the_input_itself_and_the_same_seed_gives_the_same_images():
    model, wavelet, schedule, images, ids, factual = tiny_explainer()
    settings = ExplainSettings(t0=0.0, flip_steps=0)
    record = explain_batch(model, wavelet, schedule, images, ids, factual, 2, 2, settings)
    torch.testing.assert_close(
        record["reconstructions"], images.unsqueeze(1).expand(2, 2, 3, 16, 16), atol=1e-6, rtol=0
    )
    assert record["maps"].abs().max() < 1e-6

    settings = ExplainSettings(t0=0.5, sampling_steps=4, flip_steps=0)
    first = explain_batch(model, wavelet, schedule, images, ids, factual, 2, 2, settings)["reconstructions"]
    again = explain_batch(model, wavelet, schedule, images, ids, factual, 2, 2, settings)["reconstructions"]
    alone = explain_batch(model, wavelet, schedule, images[1:], ids[1:], factual[1:], 2, 2, settings)["reconstructions"]
    other_seed = explain_batch(
        model, wavelet, schedule, images, ids, factual, 2, 2, ExplainSettings(t0=0.5, sampling_steps=4, seed=1)
    )
    assert torch.equal(first, again)
    torch.testing.assert_close(first[1:], alone)  # an image's explanation does not depend on its batch
    assert not torch.allclose(first, other_seed["reconstructions"])


def explain_tiny(**settings) -> dict:
    """explain_batch of tiny_explainer() with 4 DDIM steps from t0 = 0.5, no flip check; keyword
    arguments of explain_batch (masks, first_draw) go to it, the others to ExplainSettings."""
    model, wavelet, schedule, images, ids, factual = tiny_explainer()
    extra = {key: settings.pop(key) for key in ("masks", "first_draw") if key in settings}
    options = ExplainSettings(t0=0.5, sampling_steps=4, flip_steps=0, **settings)
    return explain_batch(model, wavelet, schedule, images, ids, factual, 2, 2, options, **extra)


def test_one_noise_draw_is_the_explanation_of_before():
    record = explain_tiny()
    # The single draw as it was computed before noise_draws existed, written out again from the units:
    # eps from the image's EXPLANATION_STEP stream, one z_t0 per image, guided DDIM toward both classes.
    model, wavelet, schedule, images, ids, factual = tiny_explainer()
    eps = normals(pair_keys(ids, torch.tensor(EXPLANATION_STEP), seed=0), (12, 8, 8))
    z = noise_to(wavelet.encode(images), eps, 0.5, schedule).repeat_interleave(2, dim=0)
    sampled = wavelet.decode(ddim_sample(model, z, torch.arange(2).repeat(2), schedule, 0.5, 4, 7.5, 2))
    reference = sampled.clamp(-1, 1).view(2, 2, 3, 16, 16)
    assert torch.equal(record["reconstructions"], reference)
    assert torch.equal(record["maps"], difference_maps(reference, factual, signed_for(images, "auto")))
    # and the numbers the code of before gave (same setup, printed before the change; the last bits
    # depend on the number of threads, hence the tolerance)
    torch.testing.assert_close(
        record["maps"][0, 0, :2, :3],
        torch.tensor([[4.057784080505371, 1.750878095626831, 1.9337968826293945], [1.0900575, 0.8924228, 1.0900576]]),
    )
    assert record["maps"].abs().sum().item() == pytest.approx(882.6679077148438, rel=1e-5)


def test_several_noise_draws_average_the_single_draw_maps():
    together = explain_tiny(noise_draws=3)
    alone = [explain_tiny(first_draw=k) for k in range(3)]  # draw k alone: the image's stream k
    assert not torch.allclose(alone[0]["maps"], alone[1]["maps"])  # the draws differ
    torch.testing.assert_close(together["maps"], torch.stack([r["maps"] for r in alone]).mean(0))
    mean_reconstructions = torch.stack([r["reconstructions"] for r in alone]).mean(0)
    torch.testing.assert_close(together["reconstructions"], mean_reconstructions)


def test_colour_maps_of_several_draws_average_the_magnitudes():
    # two draws whose counterfactuals change one pixel in opposite directions: each draw's colour map
    # shows the change; the map of the mean reconstructions would show nothing
    factual = torch.zeros(1, 2, 1, 3, 1, 2)  # (B, K, C, channels, H, W), factual class 0
    change = torch.tensor([0.4, -0.4]).view(1, 2, 1, 1, 1, 1) * torch.tensor([1.0, 0.0]).view(1, 1, 1, 1, 1, 2)
    reconstructions = torch.cat([factual, factual + change], dim=2)
    maps = mean_difference_maps(reconstructions, torch.tensor([0]), torch.tensor([False]))
    torch.testing.assert_close(maps[0, 1], torch.tensor([[1.2, 0.0]]))  # 3 channels x 0.4
    signed = mean_difference_maps(reconstructions, torch.tensor([0]), torch.tensor([True]))
    assert signed.abs().max() == 0  # signed maps: the mean of the maps is the map of the means


def test_border_zeroes_the_map_edges_before_scoring():
    plain, framed = explain_tiny(), explain_tiny(border=2)
    ring = torch.ones(16, 16, dtype=torch.bool)
    ring[2:-2, 2:-2] = False
    assert framed["maps"][..., ring].abs().sum() == 0 and plain["maps"][..., ring].abs().sum() > 0
    assert torch.equal(framed["maps"][..., 2:-2, 2:-2], plain["maps"][..., 2:-2, 2:-2])
    assert torch.equal(finish_maps(plain["maps"], ExplainSettings()), plain["maps"])  # border 0: untouched
    # the top 5 % of |map| for the concentration number is taken from the zeroed map
    assert not torch.equal(framed["inside"], plain["inside"])


def test_gaussian_smoothing_keeps_mass_and_level():
    delta = torch.zeros(1, 1, 15, 15)
    delta[..., 7, 7] = 1.0
    blurred = gaussian_blur(delta, 1.0)
    assert blurred.sum().item() == pytest.approx(1.0) and blurred[..., 7, 7] < 0.2
    assert torch.allclose(blurred, blurred.flip(-1)) and torch.allclose(blurred, blurred.transpose(-1, -2))
    level = torch.full((2, 3, 8, 8), 0.7)
    torch.testing.assert_close(gaussian_blur(level, 2.0), level)  # no darkening at the edges
    assert gaussian_blur(delta, 0.0) is delta


def square_mask(size: int = 16) -> torch.Tensor:
    """(1, size, size) bool: the finding is the 4x4 square at rows and columns 4..7."""
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[0, 4:8, 4:8] = True
    return mask


def changed_pair(rows: slice, columns: slice, value: float = 0.5) -> torch.Tensor:
    """(1, 2, 16, 16) signed maps of a hand-made factual (class 0, all zeros) and counterfactual (class 1)
    that differ by `value` at (rows, columns) only."""
    factual = torch.zeros(1, 3, 16, 16)
    counterfactual = factual.clone()
    counterfactual[0, :, rows, columns] = value
    return difference_maps(torch.stack([factual, counterfactual], dim=1), torch.tensor([0]), torch.tensor([True]))


def test_localisation_of_a_change_inside_and_outside_the_finding():
    inside = localisation(changed_pair(slice(5, 7), slice(5, 7)), square_mask())
    assert inside["hit"].tolist() == [[0.0, 1.0]]  # the factual class's own map is zero: points nowhere
    assert inside["mass_inside"].tolist() == [[0.0, 1.0]]
    assert inside["mask_share"].tolist() == [[16 / 256, 16 / 256]]  # the chance level: the mask's area share
    outside = localisation(changed_pair(slice(10, 14), slice(9, 13), value=-0.5), square_mask())
    assert outside["hit"][0, 1] == 0 and outside["mass_inside"][0, 1] == 0
    # a darker change counts like a brighter one (|map|), half inside the square: half the mass
    half = localisation(changed_pair(slice(4, 8), slice(6, 10), value=-0.5), square_mask())
    assert half["mass_inside"][0, 1].item() == pytest.approx(0.5)
    # the chance level counts only the pixels a map with a border can light up
    framed = localisation(changed_pair(slice(5, 7), slice(5, 7)), square_mask(), border=2)
    assert framed["mask_share"][0, 1].item() == pytest.approx(16 / 144) and framed["hit"][0, 1] == 1


def test_pointing_game_looks_at_the_smoothed_maximum():
    maps = changed_pair(slice(4, 7), slice(4, 7), value=1.5)  # a changed region inside the square
    maps[0, 1, 12, 12] = 3.0  # and one stray pixel outside it, the largest single value
    scores = localisation(maps, square_mask())
    assert maps[0, 1].abs().argmax() == 12 * 16 + 12  # the raw maximum would miss
    assert scores["hit"][0, 1] == 1
    assert scores["mass_inside"][0, 1].item() == pytest.approx(9 * 1.5 / (9 * 1.5 + 3.0))


def test_explain_batch_scores_the_maps_against_the_masks():
    masks = torch.zeros(2, 1, 16, 16)
    masks[0, :, 2:10, 2:10] = 0.8  # image 0 has a finding; 0.8 >= the 0.5 that binarises a soft mask
    masks[1, :, 0:4, 0:4] = 0.3  # below the level: image 1 has none
    record = explain_tiny(masks=masks)
    assert record["mask"].dtype == torch.bool and record["mask"].sum().tolist() == 64
    assert record["hit"].shape == record["mass_inside"].shape == record["mask_share"].shape == (2, 2)
    assert record["mask_share"][:, 0].tolist() == [64 / 256, 0.0]
    magnitude = record["maps"][0, 0].abs()
    assert record["mass_inside"][0, 0].item() == pytest.approx(float(magnitude[2:10, 2:10].sum() / magnitude.sum()))
    assert torch.equal(record["maps"], explain_tiny()["maps"])  # the masks only score the maps
    with pytest.raises(ValueError, match="masks"):
        explain_tiny(masks=masks[..., :8, :8])


def test_localisation_numbers_count_only_counterfactuals_of_images_with_a_finding():
    rows = {  # three images, two classes; factual classes 0, 1, 0; image 2 has no finding
        "factual": torch.tensor([0, 1, 0]),
        "l1": torch.zeros(3, 2),
        "l2": torch.zeros(3, 2),
        "inside": torch.ones(3, 2),
        "outside": torch.ones(3, 2),
        "hit": torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]),
        "mass_inside": torch.tensor([[0.0, 0.6], [0.2, 0.9], [0.0, 0.4]]),
        "mask_share": torch.tensor([[0.1, 0.1], [0.3, 0.3], [0.0, 0.0]]),
    }
    numbers = faithfulness(rows, ["a", "b"])
    assert numbers["n_localised"] == 2  # image 0 -> b, image 1 -> a
    assert numbers["pointing_game"] == pytest.approx(0.5)
    assert numbers["mass_inside_mask"] == pytest.approx((0.6 + 0.2) / 2)
    assert numbers["chance_mass"] == pytest.approx((0.1 + 0.3) / 2)
    no_finding = faithfulness(rows | {"mask_share": torch.zeros(3, 2)}, ["a", "b"])
    assert no_finding["n_localised"] == 0 and no_finding["pointing_game"] is None
    assert "pointing_game" not in faithfulness({k: v for k, v in rows.items() if k != "hit"}, ["a", "b"])


def test_figures_outline_the_finding_on_the_input_and_the_map():
    import matplotlib.pyplot as plt

    record = explain_tiny(masks=square_mask().float().unsqueeze(0).expand(2, 1, 16, 16).clone())
    record["mask"][1] = False  # image 1 without a finding: no outline
    figure = plot_explanations(explanation_rows(record), ["a", "b"])
    outlined = [len(axis.collections) > 0 for axis in figure.axes if axis.images]
    plt.close(figure)
    # per image: input, factual, counterfactual, map (+ its colour bar, which has no image)
    assert outlined == [True, False, False, True, False, False, False, False]


def test_bad_settings_are_refused_with_their_name():
    with pytest.raises(ValueError, match="explanation.factual"):
        ExplainSettings(factual="truth")
    for name in ("noise_draws", "border", "smoothing"):
        with pytest.raises(ValueError, match=f"explanation.{name}"):
            ExplainSettings(**{name: -1})
    with pytest.raises(ValueError, match="explanation.noise_draws"):
        ExplainSettings(noise_draws=0)
    with pytest.raises(ValueError, match="explanation.t0"):
        ExplainSettings(t0=1.5)
    with pytest.raises(ValueError, match="explanation.top_fraction"):
        ExplainSettings(top_fraction=0.0)


EXPLAIN_ARGS = [
    "--model.init_args.explain=true",
    "--model.init_args.explanation.sampling_steps=3",
    "--model.init_args.explanation.summary_images=3",
]


tiny_args = functools.partial(runs.tiny_args, validate=True)


def test_predict_explain_writes_pngs_npz_and_explain_json(tmp_path, capsys):
    main(["fit", *tiny_args(tmp_path, "--trainer.max_steps=2")])
    cli = main(
        [
            "predict",
            *tiny_args(tmp_path),
            "--ckpt_path=last",
            *EXPLAIN_ARGS,
            "--model.init_args.explanation.flip_steps=3",
        ]
    )
    run = tmp_path / "tensorboard" / f"version_{cli.trainer.logger.version}"
    pictures = sorted(p.name for p in (run / "explanations").glob("image_*.png"))
    assert pictures == sorted(f"image_{i}.png" for i in TEST_IDS) and (run / "explanations" / "summary.png").is_file()
    arrays = [np.load(path) for path in (run / "explanations").glob("ids_*.npz")]
    assert sum(len(a["id"]) for a in arrays) == 7
    assert arrays[0]["reconstructions"].shape[1:] == (2, 3, 16, 16) and arrays[0]["maps"].shape[1:] == (2, 16, 16)
    numbers = json.loads((run / "explain.json").read_text())
    assert numbers["n_images"] == 7 and numbers["n_counterfactuals"] == 7
    assert numbers["flip_rate"] == pytest.approx(flip_rate_of(arrays)) and numbers["settings"]["sampling_steps"] == 3
    # the synthetic data mark their findings: the maps are scored against them, over the counterfactuals of
    # the images with a finding (one counterfactual per image with two classes)
    with_finding = sum(int(a["mask"].any(axis=(1, 2)).sum()) for a in arrays)
    assert with_finding == 3 and numbers["n_localised"] == with_finding  # the 3 effusions of the 7 test images
    hits = np.concatenate([a["hit"][a["mask_share"] > 0].reshape(-1, 2).max(axis=1) for a in arrays])
    assert numbers["pointing_game"] == pytest.approx(hits.mean())  # the factual class's own map never hits
    assert 0 < numbers["chance_mass"] < 0.2 and 0 <= numbers["mass_inside_mask"] <= 1
    assert (run / "predictions.csv").read_text().count("\n") == 8  # predictions are still written
    assert str(run / "explanations" / "summary.png") in explanation_summary(tmp_path)  # what `make demo` prints

    # flip_steps = 0 skips the flip check: the other numbers are still there
    cli = main(
        [
            "predict",
            *tiny_args(tmp_path),
            "--ckpt_path=last",
            *EXPLAIN_ARGS,
            "--model.init_args.explanation.flip_steps=0",
        ]
    )
    numbers = json.loads(
        (tmp_path / "tensorboard" / f"version_{cli.trainer.logger.version}" / "explain.json").read_text()
    )
    assert "flip_rate" not in numbers and numbers["n_images"] == 7 and numbers["l2_input_factual"] > 0


def test_fit_logs_monitoring_images_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main(
        [
            "fit",
            *tiny_args(
                tmp_path,
                "--trainer.max_steps=3",
                "--model.init_args.explanation.every_n_epochs=1",
                "--model.init_args.explanation.monitor_steps=2",
                "--model.init_args.explanation.monitor_images=2",
            ),
        ]
    )
    events = next((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
    accumulator.Reload()
    assert {"explain/validation", "explain/samples_from_noise"} <= set(accumulator.Tags()["images"])
    # the first two validation images hold one effusion: the maps are scored against its mask
    assert {"explain/pointing_game", "explain/mass_inside_mask"} <= set(accumulator.Tags()["scalars"])
    assert 0 <= accumulator.Scalars("explain/mass_inside_mask")[0].value <= 1

"""Counterfactual explanations: difference-map conventions, faithfulness numbers computed by hand,
reproducibility, and the `predict --model.init_args.explain true` command end to end."""

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
    is_grayscale,
    signed_for,
)
from diffusion.schedule import ShiftedCosineSchedule
from diffusion.wavelet import HaarWavelet
from evaluation.explanations import faithfulness
from tests import helpers
from tests.helpers import TEST_IDS, LabelledLinear, flip_rate_of
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


def test_t0_zero_explains_with_the_input_itself_and_the_same_seed_gives_the_same_images():
    torch.manual_seed(0)
    model, wavelet, schedule = LabelledLinear(channels=12), HaarWavelet(), ShiftedCosineSchedule(8)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    ids, factual = torch.tensor([5, 9]), torch.tensor([1, 0])
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


def test_bad_settings_are_refused_with_their_name():
    with pytest.raises(ValueError, match="explanation.factual"):
        ExplainSettings(factual="truth")
    with pytest.raises(ValueError, match="explanation.t0"):
        ExplainSettings(t0=1.5)
    with pytest.raises(ValueError, match="explanation.top_fraction"):
        ExplainSettings(top_fraction=0.0)


EXPLAIN_ARGS = [
    "--model.init_args.explain=true",
    "--model.init_args.explanation.sampling_steps=3",
    "--model.init_args.explanation.summary_images=3",
]


tiny_args = functools.partial(helpers.tiny_args, validate=True)


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

import pytest
import torch

from diffusion.engine import ClassifierSettings, NonFiniteOutputError, classify_images, reconstruction_error
from diffusion.noise import shared_noise
from diffusion.parameterization import diffuse, eps_from_v, v_target, x_from_v
from diffusion.schedule import ShiftedCosineSchedule, broadcast_like

SCHEDULE = ShiftedCosineSchedule(8)


class ToyDenoiser(torch.nn.Module):
    """A fixed, class-dependent, deterministic function of (z, t, label)."""

    def __init__(self, num_classes=3, channels=4):
        super().__init__()
        torch.manual_seed(0)
        self.mix = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.class_bias = torch.nn.Parameter(torch.randn(num_classes, channels, 1, 1))
        self.calls = []

    def forward(self, z, t, labels):
        self.calls.append(len(z))
        return self.mix(z) * t.view(-1, 1, 1, 1) + self.class_bias[labels]


def error_matrix(denoiser, x, ids, num_classes, num_steps, schedule, space="eps", max_forward_batch=256):
    """The full (B, C, N) error matrix: every step, every class."""
    settings = ClassifierSettings(num_steps=num_steps, error_space=space, max_forward_batch=max_forward_batch)
    return classify_images(denoiser, x, ids, num_classes, schedule, settings)["errors"]


def reference_errors(denoiser, x, ids, num_classes, num_steps, space):
    """Second code path: the paper's Appendix A loops, one image, one step, one class at a time."""
    out = torch.empty(len(x), num_classes, num_steps)
    for i in range(len(x)):
        t, eps = shared_noise(ids[i : i + 1], range(num_steps), tuple(x.shape[1:]), seed=0)
        for k in range(num_steps):
            alpha, sigma = (s.view(1, 1, 1, 1) for s in SCHEDULE.alpha_sigma(t[0, k : k + 1]))
            z = diffuse(x[i : i + 1], eps[0, k : k + 1], alpha, sigma)
            for c in range(num_classes):
                v_hat = denoiser(z, t[0, k : k + 1], torch.tensor([c]))
                out[i, c, k] = reconstruction_error(v_hat, z, x[i : i + 1], eps[0, k : k + 1], alpha, sigma, space)[0]
    return out


@pytest.mark.parametrize("space", ["eps", "x", "v"])
def test_batched_classes_match_the_loop_reference(space):
    denoiser = ToyDenoiser()
    x, ids = torch.randn(3, 4, 8, 8), torch.tensor([10, 11, 12])
    with torch.no_grad():
        expected = reference_errors(denoiser, x, ids, 3, 5, space)
    got = error_matrix(denoiser, x, ids, 3, 5, SCHEDULE, space=space, max_forward_batch=18)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_all_classes_go_through_one_forward():
    denoiser = ToyDenoiser()
    error_matrix(denoiser, torch.randn(4, 4, 8, 8), torch.arange(4), 3, 6, SCHEDULE, max_forward_batch=24)
    assert denoiser.calls == [24, 24, 24]  # 2 steps x 3 classes x 4 images per forward


def test_errors_do_not_depend_on_batch_composition_or_chunking():
    denoiser = ToyDenoiser()
    x, ids = torch.randn(4, 4, 8, 8), torch.tensor([7, 1, 42, 3])
    together = error_matrix(denoiser, x, ids, 3, 7, SCHEDULE, max_forward_batch=1000)
    one_by_one = torch.cat(
        [error_matrix(denoiser, x[i : i + 1], ids[i : i + 1], 3, 7, SCHEDULE, max_forward_batch=3) for i in range(4)]
    )
    torch.testing.assert_close(together, one_by_one, rtol=1e-5, atol=1e-6)
    reordered = error_matrix(denoiser, x.flip(0), ids.flip(0), 3, 7, SCHEDULE)
    torch.testing.assert_close(reordered.flip(0), together, rtol=1e-5, atol=1e-6)


def test_error_spaces_are_related_by_alpha_and_sigma():
    # eps_hat - eps = alpha * (v_hat - v) and x_hat - x = -sigma * (v_hat - v)
    torch.manual_seed(3)
    x, eps, v_hat = torch.randn(3, 5, 4, 8, 8, dtype=torch.float64)
    alpha, sigma = (broadcast_like(s, x) for s in SCHEDULE.alpha_sigma(torch.rand(5, dtype=torch.float64)))
    z = diffuse(x, eps, alpha, sigma)
    errors = {space: reconstruction_error(v_hat, z, x, eps, alpha, sigma, space) for space in ("eps", "x", "v")}
    torch.testing.assert_close(errors["eps"].double(), (alpha.flatten() ** 2 * errors["v"]).double(), rtol=1e-5, atol=0)
    torch.testing.assert_close(errors["x"].double(), (sigma.flatten() ** 2 * errors["v"]).double(), rtol=1e-5, atol=0)
    assert torch.allclose(eps_from_v(z, v_target(x, eps, alpha, sigma), alpha, sigma), eps)
    assert torch.allclose(x_from_v(z, v_target(x, eps, alpha, sigma), alpha, sigma), x)


def test_a_perfect_class_model_wins_every_vote():
    """A denoiser that knows the clean image of class 1 only: class 1 gets all votes."""
    x = torch.randn(1, 4, 8, 8)

    def denoiser(z, t, labels):
        alpha, sigma = (broadcast_like(s, z) for s in SCHEDULE.alpha_sigma(t))
        eps = (z - alpha * x) / sigma
        v_true = v_target(x.expand_as(z), eps, alpha, sigma)
        return torch.where(broadcast_like(labels == 1, z), v_true, torch.zeros_like(z))

    errors = error_matrix(denoiser, x, torch.tensor([0]), 2, 9, SCHEDULE)
    assert (errors[0, 1] < errors[0, 0]).all()
    assert errors[0, 1].max() < 1e-6


def test_unknown_error_space_is_refused():
    with pytest.raises(ValueError, match="error space"):
        reconstruction_error(*torch.zeros(6, 1, 2), space="l1")


# ---- the engine: early exit, pruning, stratified t, batch-size invariance ---------------------
from diffusion.voting import summarize  # noqa: E402


def biased_denoiser(num_classes=2, channels=4):
    """ToyDenoiser whose class biases are small, so votes are split and early exit has work to do."""
    model = ToyDenoiser(num_classes, channels)
    with torch.no_grad():
        model.class_bias.mul_(0.05)
    return model


def test_exact_early_exit_gives_the_full_n_prediction_with_fewer_forwards():
    denoiser, x, ids = biased_denoiser(), torch.randn(16, 4, 8, 8), torch.arange(16)
    full = classify_images(denoiser, x, ids, 2, SCHEDULE, ClassifierSettings(num_steps=41, max_forward_batch=64))
    fast = classify_images(
        denoiser, x, ids, 2, SCHEDULE, ClassifierSettings(num_steps=41, early_exit="exact", max_forward_batch=64)
    )
    assert torch.equal(summarize(fast["errors"])["prediction"], summarize(full["errors"])["prediction"])
    assert (full["forwards"] == 2 * 41).all()
    assert fast["forwards"].sum() < full["forwards"].sum()
    # the steps it did evaluate are the very same ones as in the full run
    evaluated = ~fast["errors"].isnan()
    torch.testing.assert_close(fast["errors"][evaluated], full["errors"][evaluated])
    assert torch.equal(fast["forwards"], 2 * evaluated[:, 0].sum(dim=1))


def test_sequential_early_exit_stops_confident_images():
    denoiser, x, ids = ToyDenoiser(2), torch.randn(8, 4, 8, 8), torch.arange(8)
    settings = ClassifierSettings(
        num_steps=101, early_exit="sequential", alpha=0.01, min_steps=10, max_forward_batch=32
    )
    fast = classify_images(denoiser, x, ids, 2, SCHEDULE, settings)
    full = classify_images(denoiser, x, ids, 2, SCHEDULE, ClassifierSettings(num_steps=101))
    summary = summarize(fast["errors"])
    # with unanimous votes the binomial tail is 2^-n: the first check at >= 10 steps stops it
    unanimous = summary["votes"].min(dim=1).values == 0
    assert unanimous.any() and (summary["steps"][unanimous] < 101).all()
    assert (fast["forwards"] <= full["forwards"]).all()


def test_pruning_keeps_the_best_classes_and_counts_forwards():
    denoiser, x, ids = ToyDenoiser(4), torch.randn(5, 4, 8, 8), torch.arange(5)
    settings = ClassifierSettings(num_steps=12, prune_after=4, prune_keep=2, max_forward_batch=1000)
    run = classify_images(denoiser, x, ids, 4, SCHEDULE, settings)
    assert (run["forwards"] == 4 * 4 + 2 * 8).all()
    full = error_matrix(denoiser, x, ids, 4, 12, SCHEDULE)
    kept = full[:, :, :4].mean(dim=2).argsort(dim=1, stable=True)[:, :2]
    pruned = run["errors"][:, :, 0].isinf()
    for image in range(5):
        assert set((~pruned[image]).nonzero().flatten().tolist()) == set(kept[image].tolist())
    prediction = summarize(run["errors"])["prediction"]
    assert (~pruned.gather(1, prediction[:, None])).all()  # the answer is one of the kept classes
    # kept classes have exactly the full run's errors at every step
    for image in range(5):
        for c in kept[image].tolist():
            torch.testing.assert_close(run["errors"][image, c], full[image, c])


def test_stratified_times_cover_every_stratum_once():
    seen = []

    def recording_denoiser(z, t, labels):
        seen.append(t.clone())
        return torch.zeros_like(z)

    settings = ClassifierSettings(num_steps=10, stratified=True, max_forward_batch=1000)
    classify_images(recording_denoiser, torch.randn(1, 4, 8, 8), torch.tensor([3]), 2, SCHEDULE, settings)
    t = torch.cat(seen)[::2]  # two classes per step share t
    assert sorted((t * 10).floor().long().tolist()) == list(range(10))


def test_decision_points_depend_on_the_settings_alone():
    exact = ClassifierSettings(num_steps=51, early_exit="exact", check_every=10)
    assert exact.decision_points(2) == [10, 20, 30, 40, 50] and exact.segment_ends(2) == [10, 20, 30, 40, 50, 51]
    assert ClassifierSettings(num_steps=51).decision_points(2) == []  # no exit: one segment
    assert ClassifierSettings(num_steps=51).segment_ends(2) == [51]
    pruning = ClassifierSettings(num_steps=51, early_exit="sequential", check_every=10, prune_after=25, prune_keep=2)
    assert pruning.decision_points(4) == [30, 40, 50]  # never before the classes are pruned
    assert pruning.segment_ends(4) == [25, 30, 40, 50, 51]
    assert pruning.decision_points(2) == [10, 20, 30, 40, 50]  # 2 classes: nothing to prune


def test_every_output_is_the_same_whatever_the_batch_the_order_and_the_forward_size():
    """The contract, on the engine: early exit none / exact / sequential, 2 classes, and 4 classes
    with pruning; one image at a time, all together, reversed, with other forward sizes."""
    x, ids = torch.randn(9, 4, 8, 8), torch.arange(100, 109)
    for num_classes, extra in [(2, {}), (4, {"prune_after": 15, "prune_keep": 2})]:
        denoiser = biased_denoiser(num_classes)
        for rule in ("none", "exact", "sequential"):
            settings = ClassifierSettings(num_steps=61, early_exit=rule, check_every=5, max_forward_batch=12, **extra)
            together = classify_images(denoiser, x, ids, num_classes, SCHEDULE, settings)
            alone = [
                classify_images(denoiser, x[i : i + 1], ids[i : i + 1], num_classes, SCHEDULE, settings)
                for i in range(9)
            ]
            assert torch.equal(together["forwards"], torch.cat([a["forwards"] for a in alone]))
            assert torch.equal(together["errors"].isnan(), torch.cat([a["errors"] for a in alone]).isnan())
            torch.testing.assert_close(together["errors"], torch.cat([a["errors"] for a in alone]), equal_nan=True)
            larger = ClassifierSettings(num_steps=61, early_exit=rule, check_every=5, max_forward_batch=64, **extra)
            reversed_run = classify_images(denoiser, x.flip(0), ids.flip(0), num_classes, SCHEDULE, larger)
            assert torch.equal(reversed_run["forwards"].flip(0), together["forwards"])
            for key in ("prediction", "votes", "steps"):
                assert torch.equal(summarize(reversed_run["errors"])[key].flip(0), summarize(together["errors"])[key])


def test_sequential_exit_after_pruning_uses_fewer_forwards_than_full_n():
    denoiser, x, ids = ToyDenoiser(4), torch.randn(6, 4, 8, 8), torch.arange(6)
    prune = {"prune_after": 10, "prune_keep": 2, "max_forward_batch": 64}
    full = classify_images(denoiser, x, ids, 4, SCHEDULE, ClassifierSettings(num_steps=101, **prune))
    fast = classify_images(
        denoiser, x, ids, 4, SCHEDULE, ClassifierSettings(num_steps=101, early_exit="sequential", **prune)
    )
    assert (full["forwards"] == 4 * 10 + 2 * 91).all()
    assert (fast["forwards"] < full["forwards"]).all() and (fast["forwards"] >= 4 * 10).all()  # not before pruning
    agree = summarize(fast["errors"])["prediction"] == summarize(full["errors"])["prediction"]
    assert agree.float().mean() >= 5 / 6


def test_a_non_finite_network_output_is_an_error_naming_image_step_and_class():
    def broken(z, t, labels):
        v = torch.zeros_like(z)
        v[(labels == 1) & (t > 0.5)] = float("nan")  # class 1 at large t
        return v

    settings = ClassifierSettings(num_steps=20, max_forward_batch=8)
    with pytest.raises(NonFiniteOutputError, match=r"image id 7 at step \d+, class 1"):
        classify_images(broken, torch.randn(1, 4, 8, 8), torch.tensor([7]), 2, SCHEDULE, settings)


def test_settings_refuse_bad_options_by_name():
    with pytest.raises(ValueError, match="early_exit"):
        ClassifierSettings(early_exit="sometimes")
    with pytest.raises(ValueError, match="majority"):
        ClassifierSettings(early_exit="exact", rule="mean")


def test_t_range_maps_each_pairs_own_time_onto_the_range():
    """Restricting t keeps each (image, step) pair's own draw, mapped linearly: low + (high - low) * t."""
    times = {}
    for t_range in [(0.0, 1.0), (0.25, 0.75)]:
        seen = []

        def recording_denoiser(z, t, labels, seen=seen):
            seen.append(t.clone())
            return torch.zeros_like(z)

        settings = ClassifierSettings(num_steps=12, max_forward_batch=1000, t_range=t_range)
        classify_images(recording_denoiser, torch.randn(2, 4, 8, 8), torch.tensor([5, 9]), 2, SCHEDULE, settings)
        times[t_range] = torch.cat(seen)
    full, restricted = times[(0.0, 1.0)], times[(0.25, 0.75)]
    torch.testing.assert_close(restricted, 0.25 + 0.5 * full)
    assert restricted.min() >= 0.25 and restricted.max() < 0.75
    with pytest.raises(ValueError, match=r"t_range=\[0.5, 0.5\]"):
        ClassifierSettings(t_range=(0.5, 0.5))


def hand_errors(denoiser, x, ids, num_classes, num_steps, per_value):
    """Second code path for the vote's error options: the loops of reference_errors with the eps-space error
    written out, eps_hat = sigma * z + alpha * v_hat, reduced by `per_value` (eps_hat - eps) -> one number."""
    out = torch.empty(len(x), num_classes, num_steps)
    for i in range(len(x)):
        t, eps = shared_noise(ids[i : i + 1], range(num_steps), tuple(x.shape[1:]), seed=0)
        for k in range(num_steps):
            alpha, sigma = (s.view(1, 1, 1, 1) for s in SCHEDULE.alpha_sigma(t[0, k : k + 1]))
            z = alpha * x[i : i + 1] + sigma * eps[0, k : k + 1]
            for c in range(num_classes):
                v_hat = denoiser(z, t[0, k : k + 1], torch.tensor([c]))
                out[i, c, k] = per_value((sigma * z + alpha * v_hat - eps[0, k : k + 1])[0])
    return out


@pytest.mark.parametrize(
    "options, per_value",
    [
        ({"error_norm": "l1"}, lambda d: d.abs().mean()),
        ({"band_weights": (1.0, 0.0, 0.0, 0.0)}, lambda d: d[0].pow(2).mean()),  # the LL band alone
        # LL three times each detail band: (3 m_LL + m_LH + m_HL + m_HH) / 6, m the band's mean squared error
        (
            {"band_weights": (3.0, 1.0, 1.0, 1.0)},
            lambda d: (3 * d[0].pow(2).mean() + d[1:].pow(2).mean((1, 2)).sum()) / 6,
        ),
        ({"band_weights": (2.0, 2.0, 2.0, 2.0)}, lambda d: d.pow(2).mean()),  # equal weights: the paper's error
    ],
)
def test_the_votes_error_options_match_the_error_written_out(options, per_value):
    denoiser = ToyDenoiser(num_classes=2, channels=4)  # one image channel's four Haar bands (LL, LH, HL, HH)
    x, ids = torch.randn(2, 4, 8, 8), torch.tensor([3, 4])
    with torch.no_grad():
        expected = hand_errors(denoiser, x, ids, 2, 4, per_value)
    settings = ClassifierSettings(num_steps=4, max_forward_batch=6, **options)
    got = classify_images(denoiser, x, ids, 2, SCHEDULE, settings)["errors"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_band_weights_need_four_bands_of_wavelet_channels():
    with pytest.raises(ValueError, match="band_weights"):
        ClassifierSettings(band_weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="needs Haar wavelet input"):
        settings = ClassifierSettings(num_steps=2, band_weights=(1.0, 1.0, 1.0, 1.0))
        classify_images(ToyDenoiser(2, 3), torch.randn(1, 3, 8, 8), torch.tensor([0]), 2, SCHEDULE, settings)


def test_each_view_has_pairs_of_its_own_and_several_views_refuse_early_exit():
    settings = ClassifierSettings(num_steps=5, views=("identity", "hflip"))
    first, second = settings.view_settings(0), settings.view_settings(1)
    assert first.views == ("identity",) and second.views == ("hflip",) and first.seed != second.seed
    with pytest.raises(ValueError, match="views"):
        ClassifierSettings(views=("identity", "rot180"))
    with pytest.raises(ValueError, match="early_exit: none"):
        ClassifierSettings(views=("identity", "hflip"), early_exit="exact")

"""What the tools share to reach a trained model (tools/experiments.py): the benchmarks' classification of tensors,
whose answers do not depend on its batch size (the errors only within float rounding: the network sees another
batch)."""

from __future__ import annotations

import torch

from tools import shift_benchmark
from tools.experiments import classify_tensors, load_trained


def test_the_benchmarks_classify_the_same_whatever_the_batch_and_keep_the_error_matrix(tiny_checkpoint, one_thread):
    cli = load_trained(tiny_checkpoint)
    model, data = cli.model.eval(), cli.datamodule
    data.setup("validate")
    images, ids = shift_benchmark.images_of(data.split_dataset("val"), None)
    images, ids = images[:6], ids[:6]
    whole, seconds = classify_tensors(model, images, ids, batch_size=6)
    batched, _ = classify_tensors(model, images, ids, batch_size=4)
    assert seconds > 0 and whole["errors"].shape[:2] == (6, 2)  # kept although the run saved no errors
    assert whole.keys() == batched.keys()
    for key in ("prediction", "votes", "probs", "entropy", "score", "forwards", "id"):
        assert torch.equal(whole[key], batched[key]), key
    assert torch.allclose(whole["errors"], batched["errors"], atol=1e-5, equal_nan=True)
    extra, _ = classify_tensors(model, images, ids, 6, lambda model, batch: {"twice": batch["id"] * 2})
    assert torch.equal(extra["twice"], ids * 2)

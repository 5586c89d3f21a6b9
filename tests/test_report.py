"""report.html (reports/report.py): its numbers are the run's, what it shows is escaped, and a real
headless Chromium opens it from disk with every image loaded and no error in the console."""

from __future__ import annotations

import csv
import html
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from cli import main
from reports.report import REPORT_FILE, gallery_item

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them as root)",
)


class Page(HTMLParser):
    """The report's images (their src) and the text of its cards."""

    def __init__(self, text: str):
        super().__init__()
        self.images, self.cards, self._card = [], {}, None
        self._field, self._name = None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "div" and attrs.get("class") in ("name", "value"):
            self._field = attrs["class"]

    def handle_data(self, data):
        if self._field == "name":
            self._name = data.strip()
        elif self._field == "value" and self._name:
            self.cards[self._name] = data.strip()
        self._field = None


@pytest.fixture(scope="module")
def reports(calibrated, calibrated_test) -> dict[str, Path]:
    """The test report of the calibrated learned demo (100 images), and a predict report of 4 explained images."""
    root, args = calibrated
    tested = calibrated_test
    explain = ["--model.init_args.explain=true", "--model.init_args.explanation.sampling_steps=4",
               "--model.init_args.explanation.flip_steps=3", "--trainer.limit_predict_batches=1",
               "--global_batch_size=4"]  # fmt: skip
    predicted = Path(main(["predict", *args, "--ckpt_path=last", *explain]).trainer.log_dir)
    return {"test": tested / REPORT_FILE, "predict": predicted / REPORT_FILE}


def test_the_test_report_shows_the_runs_own_numbers(reports):
    page = Page(reports["test"].read_text())
    metrics = json.loads((reports["test"].parent / "metrics.json").read_text())
    assert page.cards["Accuracy"] == f"{metrics['accuracy']:.3f}" and page.cards["Images"] == "100"
    assert page.cards["Calibration error (ECE)"] == f"{metrics['ece']:.3f}"
    text = reports["test"].read_text()
    refusal = metrics["out_of_distribution"]
    assert f"{refusal['n_refused']} of 100 refused" in text
    referral = metrics["rules"]["referral"]  # OFF for this model: 200 images certify no 95 % accuracy
    on = f"{metrics['selective']['test']['n_referred']} of 100 referred"
    assert (on if referral["on"] else html.escape(f"OFF: {referral['reason']}")) in text
    # every figure the run wrote is in the page, embedded: nothing is fetched
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    figures = [p for p in reports["test"].parent.glob("*.png")]
    assert len(figures) == 6  # filtering, risk-coverage, reliability, confusion, uncertainty boxes, ood scores
    assert len(page.images) >= 6 + 8  # and at least the 8 most uncertain images


def test_the_predict_report_embeds_the_explanations(reports):
    page = Page(reports["predict"].read_text())
    explained = len(list((reports["predict"].parent / "explanations").glob("image_*.png")))
    assert explained == 4
    shown = re.findall(r'alt="explanation of image (\d+)"', reports["predict"].read_text())
    assert shown and len(set(shown)) <= 4  # each gallery image of the 4 shows its explanation
    assert "Accuracy" not in page.cards and page.cards["Images"] == "4"  # predict: counts, no metrics
    rows = list(csv.DictReader((reports["predict"].parent / "predictions.csv").open()))
    answered = [row for row in rows if row["out_of_distribution"] != "true"]
    for index, name in enumerate(["no_finding", "pleural_effusion"]):
        assert page.cards[f"Predicted {name}"] == str(sum(row["prediction"] == str(index) for row in answered))


def test_what_the_report_shows_is_escaped(tmp_path):
    from reports.records import image_records

    outputs = {"id": torch.tensor([3]), "path": ["/ward/<img src=x onerror=alert(1)>.png"],
               "prediction": torch.tensor([0]), "probs": torch.tensor([[0.6, 0.4]]), "entropy": torch.tensor([0.67]),
               "entropy_normalized": torch.tensor([0.97]), "score": torch.tensor([0.4])}  # fmt: skip
    (record,) = image_records(outputs)
    import jinja2

    from reports.report import TEMPLATES

    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True)
    card = gallery_item(record, np.zeros((4, 4, 3), dtype=np.uint8), ["a<b", "c"], tmp_path)
    page = environment.get_template(REPORT_FILE).render(
        title="t", subtitle="s", banners=[], headlines=[], rules=[], figures=[], has_metrics=False, directory="d",
        gallery=[{"title": "Most uncertain", "empty": "", "cards": [card]}],
    )  # fmt: skip
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;.png" in page
    assert "a&lt;b" in page


@needs_chromium
@pytest.mark.parametrize("stage", ["test", "predict"])
def test_a_real_browser_loads_every_image_without_errors(reports, stage, tmp_path):
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1300,2400",
                 f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        driver.get(reports[stage].resolve().as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete && i.naturalWidth > 0, i.alt])"
        )
        errors = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
        driver.save_screenshot(str(tmp_path / f"{stage}.png"))
    finally:
        driver.quit()
    assert len(images) == len(Page(reports[stage].read_text()).images) > 0
    assert all(loaded for loaded, _ in images), [alt for loaded, alt in images if not loaded]
    assert not errors, errors
    assert (tmp_path / f"{stage}.png").stat().st_size > 10_000


def test_gallery_keeps_the_best_candidates_whatever_the_batches():
    from reports.gallery import Gallery

    g = torch.Generator().manual_seed(0)
    images, n = torch.rand(40, 3, 8, 8, generator=g) * 2 - 1, 40
    outputs = {"id": torch.arange(n), "entropy": torch.rand(n, generator=g), "prediction": torch.zeros(n).long(),
               "label": (torch.arange(n) % 3 == 0).long(), "probs": torch.rand(n, 2, generator=g).softmax(1),
               "out_of_distribution": torch.arange(n) % 5 == 0, "ood_score": torch.rand(n, generator=g)}  # fmt: skip
    outputs |= {"entropy_normalized": outputs["entropy"], "score": outputs["probs"][:, 1], "ood_pvalue": torch.ones(n)}
    kept = []
    for batch in (40, 7):
        gallery = Gallery(["a", "b"], size=4)
        for start in range(0, n, batch):
            part = {key: value[start : start + batch] for key, value in outputs.items()}
            gallery.add(images[start : start + batch], part)
        kept.append({kind: [r["id"] for r in records] for kind, records in gallery.finish(None).items()})
    assert kept[0] == kept[1]
    by_hand = torch.argsort(outputs["entropy"], descending=True)[:4].tolist()
    assert kept[0]["uncertain"] == by_hand
    wrong = [i for i in range(n) if i % 3 == 0]
    assert kept[0]["wrong"] == sorted(wrong, key=lambda i: -float(outputs["probs"][i].max()))[:4]
    refused = [i for i in range(n) if i % 5 == 0]
    assert kept[0]["refused"] == sorted(refused, key=lambda i: -float(outputs["ood_score"][i]))[:4]

"""Test results on disk: `metrics.json` per run, and a short table of them.

    python -c "from lightning_modules.evaluation import main; main()" runs/demo [--seconds 312]

prints accuracy, F1, N and (if given) the wall time of the newest metrics.json under the folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS_FILE = "metrics.json"


def write_metrics(directory: str | Path, metrics: dict) -> Path:
    path = Path(directory) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return path


def newest_metrics(run_dir: str | Path) -> Path:
    candidates = sorted(Path(run_dir).rglob(METRICS_FILE), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"no {METRICS_FILE} under {run_dir}: run `python cli.py test ...` first")
    return candidates[-1]


def summary_table(metrics: dict, seconds: float | None = None) -> str:
    rows = [
        ("accuracy", f"{metrics['accuracy']:.3f}"),
        ("F1 (macro)", f"{metrics['f1']:.3f}"),
        ("test images", str(metrics["n_images"])),
        ("N (eps, t) steps", str(metrics["n_steps"])),
        ("rule", str(metrics.get("rule", "majority"))),
    ]
    if seconds is not None:
        rows.append(("seconds (fit + test)", f"{seconds:.0f}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run's default_root_dir, e.g. runs/demo")
    parser.add_argument("--seconds", type=float, default=None, help="wall time to report beside the metrics")
    args = parser.parse_args()
    path = newest_metrics(args.run_dir)
    print(f"\nTest results ({path}):\n{summary_table(json.loads(path.read_text()), args.seconds)}\n")


if __name__ == "__main__":
    main()

"""The shipped experiment configs, as the CLI resolves them."""

from __future__ import annotations

import copy
import functools

from tests.helpers import ROOT

EXPERIMENTS = sorted(path.stem for path in (ROOT / "configs").glob("*.yaml"))


def resolved(name: str) -> dict:
    """configs/<name>.yaml as the CLI resolves it (includes and defaults): a fresh copy to change at will."""
    return copy.deepcopy(_resolved(name))


@functools.cache
def _resolved(name: str) -> dict:
    from tools.experiments import resolved_config

    return resolved_config(ROOT / "configs" / f"{name}.yaml")


RESOLVED = ROOT / "tests" / "data" / "resolved_configs"
RECORD_HEADER = (
    "# `python cli.py fit --config configs/{name} --print_config`, recorded: tests/test_configs.py checks that\n"
    "# the config still resolves to these values. Record again (python -m tests.helpers.configs) only for a change\n"
    "# made on purpose, and say so in the commit.\n"
)


def record_resolved_configs() -> None:
    """Writes tests/data/resolved_configs/<experiment>.yaml for every experiment, as it resolves now."""
    import yaml

    from tools.experiments import resolved_config

    for name in EXPERIMENTS:
        text = RECORD_HEADER.format(name=f"{name}.yaml") + yaml.safe_dump(
            resolved_config(ROOT / "configs" / f"{name}.yaml"), sort_keys=False
        )
        (RESOLVED / f"{name}.yaml").write_text(text)


if __name__ == "__main__":
    record_resolved_configs()

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

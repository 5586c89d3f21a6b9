import os
from pathlib import Path

import pytest

from tests.helpers import ROOT

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def run_from_repo_root(monkeypatch):
    """Every test runs where a user runs the CLI: the repository root (configs/ paths are relative to it)."""
    monkeypatch.chdir(ROOT)


@pytest.fixture
def repo_root() -> Path:
    return ROOT

"""The real data of ../shared that tests may read, and the skip marker for clones without it."""

from pathlib import Path

import pytest

PNEUMONIAMNIST = Path(__file__).resolve().parents[2] / "shared/data/pneumoniamnist/pneumoniamnist.npz"
needs_pneumoniamnist = pytest.mark.skipif(
    not PNEUMONIAMNIST.is_file(), reason=f"{PNEUMONIAMNIST} absent (CI clones the repo beside a copy of shared/)"
)

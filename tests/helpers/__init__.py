"""What several test files share, one concern per module: tiny CLI runs (runs.py), test data
(data.py: the real PneumoniaMNIST file, a four-class synthetic set, DICOM and PNG files), small
networks and counts (models.py), configs as the CLI resolves them (configs.py)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository

"""What comes in to be classified: every file of a folder, a CSV's rows, one image or several, sorted
into the images to classify, the files skipped with a named reason, and the duplicates.

Every file found gets a row or a reason; nothing is dropped without one. Checked before any model
loads, and fast (headers, not pixels): the type (suffix, or the DICOM marker for files without
one), the header, for PNG the chunk checksums (a truncated file), for JPEG a 1/8-scale decode, for
DICOM pixel data present and a single frame. Symlinked folders are followed once (a link back to a
folder already read is named, not walked again). Duplicates (the same file reached twice, or a file
with the same bytes as another) are skipped as "duplicate of <first>" unless `keep_duplicates`.
A file that passes but still fails to decode in full stops the run with an error naming it.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pydicom
from PIL import Image, UnidentifiedImageError

from datamodules.dicom import DICOM_SUFFIXES, is_dicom
from datamodules.errors import DataError
from datamodules.table_reading import read_csv

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
IMAGE_SUFFIXES = (*PICTURE_SUFFIXES, *DICOM_SUFFIXES)
SKIPPED_FILE = "skipped.csv"  # beside predictions.csv: path, reason
PIXEL_DATA_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True)
class Intake:
    """The images to classify (sorted paths, with the CSV's label and mask columns when it has them)
    and the (path, reason) of every file left out."""

    source: str
    paths: list[str]
    labels: list[str] | None
    masks: list[str] | None
    skipped: list[tuple[str, str]]

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def summary(self) -> str:
        """e.g. "412 images, 3 skipped (2 no pixel data, 1 broken link) - see skipped.csv"."""
        line = f"{len(self.paths)} images"
        if self.skipped:
            kinds = Counter(reason.split(" (")[0].split(" of ")[0] for _, reason in self.skipped)
            counts = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
            line += f", {len(self.skipped)} skipped ({counts}) - see {SKIPPED_FILE}"
        return line

    def write_skipped(self, directory: str | Path) -> Path:
        path = Path(directory) / SKIPPED_FILE
        pd.DataFrame(self.skipped, columns=["path", "reason"]).to_csv(path, index=False)
        return path


def take_in(source: str | Path | Sequence[str | Path], root: str | Path | None = None,
            keep_duplicates: bool = False) -> Intake:  # fmt: skip
    """The intake of a folder, a CSV file (`path` column, optional `label` and `mask`; relative paths
    start at `root`, default the CSV's folder), an image file, or a list of image files and folders."""
    sources = [Path(s) for s in ([source] if isinstance(source, (str, Path)) else source)]
    labels = masks = None
    tables = [path for path in sources if is_image_list(path)]
    if tables and len(sources) > 1:
        raise DataError(
            f"{tables[0]} is a CSV of images (and labels) among {len(sources)} sources: give a CSV alone, or list "
            "its images in it together with the others"
        )
    if tables:
        found, labels, masks = csv_rows(sources[0], root)
    else:
        found = [entry for path in sources for entry in listed(path)]
    ordered = sorted(enumerate(found), key=lambda item: (item[1][0], item[0]))
    reasons = {i: reason or file_problem(path) for i, (path, reason) in ordered}
    if not keep_duplicates:
        reasons |= duplicates([(i, path) for i, (path, _) in ordered if reasons[i] is None])
    paths, kept_labels, kept_masks, skipped = [], [], [], []
    for i, (path, _) in ordered:
        if reasons[i]:
            skipped.append((path, reasons[i]))
            continue
        paths.append(path)
        kept_labels.append(None if labels is None else labels[i])
        kept_masks.append(None if masks is None else masks[i])
    shown = ", ".join(map(str, sources[:3])) + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")
    return Intake(shown, paths, None if labels is None else kept_labels, None if masks is None else kept_masks, skipped)


def duplicates(readable: list[tuple[int, str]]) -> dict[int, str]:
    """{index: "duplicate of <first> (same file | same bytes)"} over the readable files, in order. Bytes are
    hashed only where another readable file has the same size: a file of a size of its own has no copy."""
    sizes = Counter(os.path.getsize(path) for _, path in readable)
    first_of, found = {}, {}
    for i, path in readable:
        keys = [(os.path.realpath(path), "same file")]
        keys += [(content_digest(path), "same bytes")] if sizes[os.path.getsize(path)] > 1 else []
        for key, how in keys:
            if key in first_of:
                found[i] = f"duplicate of {first_of[key]} ({how})"
                break
            first_of[key] = path
    return found


def is_image_list(path: Path) -> bool:
    """A CSV file of images: by its suffix, so that an image of a type the suite does not read (.heic), a text file
    or an image without a suffix is one skipped file with its reason, never read as a table."""
    return path.suffix.lower() == ".csv" and not path.is_dir()


def looks_like_an_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES or is_dicom(path)


def listed(path: Path) -> list[tuple[str, str | None]]:
    """(path, reason to skip or None) of every file under a folder, or of one file given by name."""
    if path.is_dir():
        return folder_files(path)
    if os.path.islink(path) and not path.exists():
        return [(str(path), "broken link")]
    return [(str(path), None if path.exists() else "not found")]


def folder_files(folder: Path) -> list[tuple[str, str | None]]:
    """Every entry under `folder`, following symlinked folders once: a folder reached again (a loop, or
    two links to one place) is one entry with its reason; hidden files and folders are named too."""
    found, seen = [], {os.path.realpath(folder)}
    for directory, subfolders, files in os.walk(folder, followlinks=True):
        walked = []
        for name in sorted(subfolders):
            path = os.path.join(directory, name)
            real = os.path.realpath(path)
            if name.startswith("."):
                found.append((path, "hidden folder (not searched)"))
            elif real in seen:
                found.append((path, f"folder already read (link to {real})"))
            else:
                seen.add(real)
                walked.append(name)
        subfolders[:] = walked
        for name in files:
            path = os.path.join(directory, name)
            hidden = "hidden file" if name.startswith(".") else None
            found.append((path, hidden or ("broken link" if not os.path.exists(path) else None)))
    return found


def csv_rows(file: Path, root: str | Path | None) -> tuple[list, list | None, list | None]:
    """A CSV's rows as (full path, None) entries with its label and mask columns (read by the same
    reader as every datamodule's tables: quoted headers, a byte-order mark and CRLF line ends are fine)."""
    table = read_csv(file, ["path"], "image list")
    if "label" in table.columns:
        check_one_label_per_path(table, file)
    base = Path(root) if root is not None else file.parent
    found = [(str(base / path), None if path else f"empty path (row {row + 2} of {file})")
             for row, path in enumerate(table["path"])]  # fmt: skip
    masks = [os.path.join(base, m) if m else "" for m in table["mask"]] if "mask" in table.columns else None
    return found, table["label"].tolist() if "label" in table.columns else None, masks


def check_one_label_per_path(table: pd.DataFrame, file: Path) -> None:
    """A path listed twice with two labels is refused naming both rows: which label is right is the user's call."""
    first_row = {}
    for row, (path, label) in enumerate(zip(table["path"], table["label"])):
        if path in first_row and table["label"].iloc[first_row[path]] != label:
            other = first_row[path]
            raise DataError(
                f"{file}: {path} is listed twice with different labels: row {other + 2} says "
                f"{table['label'].iloc[other]!r}, row {row + 2} says {label!r}; keep one row per image"
            )
        first_row.setdefault(path, row)


def file_problem(path: str) -> str | None:
    """Why a file cannot be classified, or None. Checked once per file version (path, size, mtime)."""
    try:
        stat = os.stat(path)
    except OSError:
        return "broken link" if os.path.islink(path) else "not found"
    if not os.path.isfile(path):
        return "not a file"
    return _problem(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=200_000)
def _problem(path: str, size: int, mtime_ns: int) -> str | None:
    suffix = Path(path).suffix.lower()
    if size == 0:
        return "empty file (0 bytes)"
    if suffix in DICOM_SUFFIXES or (suffix not in PICTURE_SUFFIXES and is_dicom(path)):
        return dicom_problem(path)
    if suffix not in PICTURE_SUFFIXES:
        return f"unsupported type ({suffix or 'no suffix'}, not an image this suite reads)"
    try:
        with Image.open(path) as image:
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                return f"multi-frame ({frames} frames: give one image per file)"
            if image.format == "PNG":
                image.verify()  # every chunk's checksum, without inflating the pixels
            else:
                image.draft(image.mode, (1, 1))  # JPEG: decode at 1/8 scale; others decode in full
                image.load()
    except UnidentifiedImageError:
        return "not an image (the content is no image format, whatever the suffix says)"
    except (OSError, SyntaxError, ValueError) as error:
        return f"unreadable ({error})"
    return None


def dicom_problem(path: str) -> str | None:
    try:
        header = pydicom.dcmread(path, defer_size="1 KB")  # the pixel data stays on disk
    except Exception as error:  # pydicom raises InvalidDicomError, OSError, EOFError, ValueError, ...
        return f"unreadable (DICOM: {error})"
    if not any(tag in header for tag in PIXEL_DATA_TAGS):
        kind = getattr(header, "Modality", "") or "no image"
        return f"no pixel data (a DICOM without an image: {kind})"
    frames = int(header.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        return f"multi-frame (DICOM with {frames} frames: give one image per file)"
    return None


@functools.lru_cache(maxsize=200_000)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "blake2b").hexdigest()


def content_digest(path: str) -> str:
    stat = os.stat(path)
    return "bytes:" + _digest(path, stat.st_size, stat.st_mtime_ns)


def check_intake(intake: Intake, strict: bool) -> None:
    """Refuse an intake with nothing to classify, or, when `strict`, with any file skipped (naming all)."""
    if strict and intake.skipped:
        listing = "; ".join(f"{path}: {reason}" for path, reason in intake.skipped)
        raise DataError(f"{intake.source}: {len(intake.skipped)} files would be skipped (strict): {listing}")
    if not intake.paths:  # nothing is written: name the files here, not skipped.csv
        looked = f"looked for {', '.join(IMAGE_SUFFIXES)} and DICOM files"
        listing = "; ".join(f"{path}: {reason}" for path, reason in intake.skipped[:5])
        more = f" and {len(intake.skipped) - 5} more" if len(intake.skipped) > 5 else ""
        found = f"{len(intake.skipped)} skipped ({listing}{more})" if intake.skipped else "no files at all"
        raise DataError(f"no image files in {intake.source} ({looked}): {found}")

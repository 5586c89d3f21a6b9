"""DICOM files as 8-bit images, the way a radiologist's viewer shows them (pydicom does the maths).

    stored values -> modality LUT (Rescale Slope / Intercept, or a Modality LUT Sequence)
                  -> VOI LUT (a VOI LUT Sequence, or Window Center / Width), when the file has one
                  -> 0..255 over the VOI output range; without a VOI, the image's own min..max
                  -> inverted for MONOCHROME1 (where a high value is dark)

Colour files (RGB, YBR) go through pydicom's conversion to RGB. A file pydicom cannot decode
(e.g. a compressed transfer syntax without its handler installed) is a DataError naming the file,
the transfer syntax and the reason.
"""

from __future__ import annotations

import os

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from datamodules.errors import DataError

DICOM_SUFFIXES = (".dcm", ".dicom")
_PREAMBLE = 128  # bytes before the "DICM" marker of a DICOM Part 10 file


def is_dicom(path: str | os.PathLike) -> bool:
    """A .dcm / .dicom file, or any file with the DICOM Part 10 marker (hospital exports often have no suffix)."""
    if str(path).lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(_PREAMBLE)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def dicom_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the header alone."""
    header = read_header(path, pixels=False)
    return int(header.Columns), int(header.Rows)


def read_header(path: str | os.PathLike, pixels: bool = True) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except (OSError, pydicom.errors.InvalidDicomError) as error:
        raise DataError(f"cannot read DICOM file {path}: {error}") from None


def read_dicom(path: str | os.PathLike) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 pixels of a single-frame DICOM file (see the module docstring)."""
    dataset = read_header(path)
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # pydicom raises RuntimeError, NotImplementedError, ValueError by handler
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        named = f" ({syntax.name})" if syntax is not None else ""
        raise DataError(
            f"cannot decode the pixels of DICOM file {path}: transfer syntax {syntax}{named}: {error}. "
            "Install the decoder pydicom names (e.g. pylibjpeg with pylibjpeg-libjpeg, or GDCM) or convert the file"
        ) from None
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(f"DICOM file {path} holds {frames} frames: give one image per file")
    if int(getattr(dataset, "SamplesPerPixel", 1)) == 3:
        return _to_uint8(pixels.astype(np.float64), 0.0, float(2 ** int(dataset.BitsStored) - 1))
    values = apply_modality_lut(pixels, dataset).astype(np.float64)
    if _has_voi(dataset):
        low, high = apply_voi_lut(np.array([-1e30, 1e30]), dataset).astype(np.float64)  # the VOI's output range
        image = _to_uint8(apply_voi_lut(values, dataset).astype(np.float64), low, high)
    else:
        image = _to_uint8(values, float(values.min()), float(values.max()))
    if dataset.PhotometricInterpretation == "MONOCHROME1":
        image = 255 - image
    return image


def _has_voi(dataset: pydicom.Dataset) -> bool:
    return bool(dataset.get("VOILUTSequence")) or ("WindowCenter" in dataset and "WindowWidth" in dataset)


def _to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (values - low) * (255.0 / max(high - low, 1e-12))
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)

"""datamodules/dicom.py: DICOM files built with pydicom read to the 8-bit pixels a hand computation
of the DICOM rescale and window (PS3.3 C.11.2.1.2.1, LINEAR) gives; undecodable files are named."""

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEGBaseline8Bit

from datamodules.decoding import image_size_of, load_image
from datamodules.dicom import is_dicom, read_dicom
from datamodules.errors import DataError
from tests.helpers.data import STORED, write_dicom


def by_hand(window=None, rescale=(1.0, 0.0), monochrome1=False) -> np.ndarray:
    """The expected 8-bit image: rescale, then the LINEAR window (or the image's min..max), then invert."""
    values = STORED.astype(np.float64) * rescale[0] + rescale[1]
    if window is None:
        unit = (values - values.min()) / (values.max() - values.min())
    else:
        center, width = window
        unit = np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    image = np.round(255 * unit).astype(np.uint8)
    return 255 - image if monochrome1 else image


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("window", [None, (1500.0, 1000.0), (2000.0, 4096.0)])
@pytest.mark.parametrize("rescale", [(1.0, 0.0), (2.0, -1024.0)])
def test_pixels_match_the_hand_computation(tmp_path, photometric, window, rescale):
    if window is not None and rescale != (1.0, 0.0):  # the window is in rescaled units
        window = (window[0] * rescale[0] + rescale[1], window[1] * rescale[0])
    path = write_dicom(tmp_path / "image.dcm", photometric=photometric, window=window, rescale=rescale)
    expected = by_hand(window, rescale, monochrome1=photometric == "MONOCHROME1")
    assert np.array_equal(read_dicom(path), expected)


def test_a_narrow_window_clips_both_ends(tmp_path):
    path = write_dicom(tmp_path / "image.dcm", window=(2000.0, 100.0))
    image = read_dicom(path)
    assert image[0, :3].tolist() == [0, 0, 0] and image[1, 2:].tolist() == [255, 255]  # far below, far above
    assert image[0, 3] == round(255 * ((2000 - 1999.5) / 99 + 0.5))  # inside the window: linear


def test_files_without_a_suffix_are_recognised_and_loaded_like_other_images(tmp_path):
    path = write_dicom(tmp_path / "IM0001")
    assert is_dicom(path) and not is_dicom(write_text(tmp_path / "notes"))
    assert image_size_of(path) == (4, 2)
    pixels = load_image(path, size=8, channels=3)
    assert pixels.shape == (3, 8, 8) and pixels.dtype == np.uint8
    assert (pixels[0] == pixels[1]).all()  # grey, repeated


def test_an_undecodable_file_is_a_data_error_naming_it_and_its_transfer_syntax(tmp_path):
    path = write_dicom(tmp_path / "compressed.dcm", syntax=JPEGBaseline8Bit)  # raw bytes labelled as JPEG
    with pytest.raises(DataError, match=r"compressed\.dcm.*1\.2\.840\.10008\.1\.2\.4\.50"):
        read_dicom(path)
    with pytest.raises(DataError, match="cannot read DICOM file"):
        read_dicom(write_text(tmp_path / "broken.dcm"))


def write_text(path):
    path.write_text("not a DICOM file\n")
    return path


def test_pydicom_reads_the_test_files_back_as_written(tmp_path):
    dataset = pydicom.dcmread(write_dicom(tmp_path / "image.dcm", window=(1.0, 2.0)))
    assert np.array_equal(dataset.pixel_array, STORED) and float(dataset.WindowWidth) == 2.0

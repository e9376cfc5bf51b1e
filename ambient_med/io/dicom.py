"""DICOM series → canonical RAS volumes (pydicom, with pylibjpeg/pyjpegls pixel handlers).

Handles what scanners and PACS export: single-frame files and Enhanced (multi-frame) MR, any
transfer syntax pydicom's handlers decode (JPEG baseline/lossless, JPEG 2000, JPEG-LS, RLE,
implicit VR, big endian), MONOCHROME1, signed and unsigned pixels, per-frame rescale.
Files are grouped by SeriesInstanceUID and frames ordered by their position along the slice
normal — never by InstanceNumber or file name. Localizers, projections, non-MR and non-image
objects are skipped with a stated reason. Identifying attributes are read only to derive a
pseudonym and never appear in a message.

Speed: a hospital export is thousands of small files, so each file is parsed once and the
two dozen attributes ingest needs are converted straight from their encoded bytes into plain
Python values (:class:`Header`), instead of through pydicom's per-element machinery; native
(uncompressed) pixel data is read with NumPy from the bytes pydicom located. Compressed
pixel data and Enhanced MR functional groups still go through pydicom.
"""

from __future__ import annotations

import os
import re
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ambient_med.errors import AmbientMedError

# DICOM patient coordinates are LPS; NIfTI/nibabel world coordinates are RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
# MR Image, Enhanced MR Image and Legacy Converted Enhanced MR Image Storage.
MR_IMAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4",
    "1.2.840.10008.5.1.4.1.1.4.1",
    "1.2.840.10008.5.1.4.1.1.4.4",
}
LOCALIZER_WORDS = re.compile(
    r"locali[sz]er|scout|survey|pilot|3[- ]?plane|tri[- ]?plane|aahscout|plan_", re.I
)
# Pixel data above this size stays on disk until it is decoded (read by offset).
DEFER_SIZE = 64 * 1024
UNDEFINED_LENGTH = 0xFFFFFFFF
# Transfer syntaxes whose pixel data are plain arrays at a known offset in the file.
NATIVE_SYNTAXES = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian}
PIXEL_DATA = 0x7FE00010
FLOAT_PIXEL_DATA = (0x7FE00008, 0x7FE00009)

# The attributes ingest reads, by tag: (keyword, VR). The VR is needed for implicit-VR files,
# whose elements do not carry one.
FIELDS: dict[int, tuple[str, str]] = {
    0x00080008: ("ImageType", "CS"),
    0x00080016: ("SOPClassUID", "UI"),
    0x00080018: ("SOPInstanceUID", "UI"),
    0x00080060: ("Modality", "CS"),
    0x0008103E: ("SeriesDescription", "LO"),
    0x00100020: ("PatientID", "LO"),
    0x00181030: ("ProtocolName", "LO"),
    0x0020000D: ("StudyInstanceUID", "UI"),
    0x0020000E: ("SeriesInstanceUID", "UI"),
    0x00200032: ("ImagePositionPatient", "DS"),
    0x00200037: ("ImageOrientationPatient", "DS"),
    0x00280002: ("SamplesPerPixel", "US"),
    0x00280004: ("PhotometricInterpretation", "CS"),
    0x00280008: ("NumberOfFrames", "IS"),
    0x00280010: ("Rows", "US"),
    0x00280011: ("Columns", "US"),
    0x00280030: ("PixelSpacing", "DS"),
    0x00280100: ("BitsAllocated", "US"),
    0x00280101: ("BitsStored", "US"),
    0x00280103: ("PixelRepresentation", "US"),
    0x00281052: ("RescaleIntercept", "DS"),
    0x00281053: ("RescaleSlope", "DS"),
}
# Attributes whose exact text feeds the pseudonym or a pattern: anything but plain ASCII is
# left to pydicom, which applies the file's SpecificCharacterSet.
TEXT_FIELDS = {"PatientID", "SeriesDescription", "ProtocolName"}
FUNCTIONAL_GROUPS = (0x52009229, 0x52009230)  # Shared-, PerFrameFunctionalGroupsSequence
_NUMERIC_FORMATS = {"US": ("H", 2), "SS": ("h", 2), "UL": ("I", 4), "SL": ("i", 4)}


class _Unparsable(ValueError):
    """An attribute whose bytes do not decode as its VR."""


def _decode(raw: bytes, vr: str, little_endian: bool) -> Any:
    """Plain Python value(s) of an encoded element: str, float, int, or a tuple of them."""
    if vr in _NUMERIC_FORMATS:
        code, size = _NUMERIC_FORMATS[vr]
        count = len(raw) // size
        if count == 0:
            return None
        values = struct.unpack(("<" if little_endian else ">") + code * count, raw[: count * size])
        return values[0] if count == 1 else values
    text = raw.decode("latin-1")
    if vr in ("DS", "IS"):
        parts = [p.strip(" \x00") for p in text.split("\\")]
        if not any(parts):
            return None
        try:
            numbers = tuple(float(p) if vr == "DS" else int(float(p)) for p in parts)
        except ValueError:
            raise _Unparsable(vr) from None
        return numbers[0] if len(numbers) == 1 else numbers
    parts = text.rstrip(" \x00").split("\\")
    if vr == "LO":
        parts = [p.rstrip(" \x00") for p in parts]
    return parts[0] if len(parts) == 1 else tuple(parts)


@dataclass
class Header:
    """The attributes ingest reads from one DICOM file, converted once to plain values.

    Attributes:
        path: the file.
        dataset: pydicom's parse of it (pixel data over 64 KB left on disk): what the
            functional groups of Enhanced MR and compressed pixel data are read from.
        values: ``{keyword: value}`` of the :data:`FIELDS` present; unparsable ones hold
            ``_Unparsable``.
        transfer_syntax: the file's TransferSyntaxUID ('' when it has no file meta).
        media_class: its MediaStorageSOPClassUID (DICOMDIR has its own).
        pixel_offset, pixel_length: where the native pixel data lie in the file and their
            declared length (None when compressed); ``pixel_bytes`` holds them when pydicom
            read them with the header (64 KB or less).
        has_pixels: the file has (float) pixel data at all.
        has_functional_groups: Enhanced MR per-frame or shared functional groups are present.
        little_endian: the byte order of the pixel data.
        truncated: ``"header"`` or ``"pixels"`` when the file ends inside that part, else ''.
    """

    path: Path
    dataset: pydicom.Dataset = field(repr=False)
    values: dict[str, Any]
    transfer_syntax: str = ""
    media_class: str = ""
    pixel_offset: int | None = None
    pixel_length: int | None = None
    pixel_bytes: bytes | None = field(default=None, repr=False)
    has_pixels: bool = False
    has_functional_groups: bool = False
    little_endian: bool = True
    truncated: str = ""

    def get(self, keyword: str, default: Any = None) -> Any:
        value = self.values.get(keyword)
        return default if value is None or value is _Unparsable else value

    def __contains__(self, keyword: str) -> bool:
        return self.values.get(keyword) is not None

    @classmethod
    def from_dataset(cls, path: Path, ds: pydicom.Dataset, file_size: int | None = None) -> Header:
        """Extracts the attributes of a parsed dataset (raw or already converted elements)."""
        values: dict[str, Any] = {}
        elements = ds._dict  # read the encoded bytes: pydicom's conversion is the slow part
        for tag, (keyword, vr) in FIELDS.items():
            element = elements.get(tag)
            if element is None:
                continue
            values[keyword] = _value(ds, element, keyword, vr)
        meta = getattr(ds, "file_meta", None)
        syntax, media = _meta_uid(meta, 0x00020010), _meta_uid(meta, 0x00020002)
        header = cls(path, ds, values, syntax, media)
        header.little_endian = syntax != ExplicitVRBigEndian
        header.has_functional_groups = any(tag in elements for tag in FUNCTIONAL_GROUPS)
        pixels = elements.get(PIXEL_DATA)
        header.has_pixels = pixels is not None or any(t in elements for t in FLOAT_PIXEL_DATA)
        if isinstance(pixels, RawDataElement) and syntax in NATIVE_SYNTAXES:
            header.pixel_length = pixels.length
            header.pixel_offset = pixels.value_tell
            header.pixel_bytes = pixels.value
        elif isinstance(pixels, DataElement) and syntax in NATIVE_SYNTAXES:
            header.pixel_bytes = pixels.value
            header.pixel_length = len(pixels.value or b"")
        if file_size is not None and syntax != pydicom.uid.DeflatedExplicitVRLittleEndian:
            header.truncated = _truncation(elements, file_size)
        return header


def _value(ds: pydicom.Dataset, element: Any, keyword: str, vr: str) -> Any:
    if isinstance(element, RawDataElement):
        raw = element.value
        if raw is None:  # deferred: not one of the short attributes ingest reads
            return None
        if keyword in TEXT_FIELDS and (not raw.isascii() or b"\\" in raw.rstrip(b" \x00")):
            return _pydicom_text(ds, keyword, raw)
        # Elements stored as UN (some anonymisers write them so) are read as their known VR.
        encoded_vr = element.VR if element.VR not in (None, "UN") else vr
        try:
            return _decode(raw, encoded_vr, element.is_little_endian)
        except (_Unparsable, struct.error):
            return _Unparsable
    value = element.value
    if value is None or value == "":
        return None
    if keyword in TEXT_FIELDS:
        return str(value)
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        items = tuple(float(v) if vr == "DS" else v for v in value)
        return items if len(items) != 1 else items[0]
    if vr == "DS":
        return float(value)
    if vr == "IS":
        return int(value)
    return value if isinstance(value, int) else str(value)


def _meta_uid(meta: pydicom.Dataset | None, tag: int) -> str:
    """A UID of the file meta group ('' when absent), without pydicom's element conversion."""
    element = meta._dict.get(tag) if meta is not None else None
    if element is None:
        return ""
    if isinstance(element, RawDataElement):
        return (element.value or b"").decode("latin-1").rstrip(" \x00")
    return str(element.value or "")


def _pydicom_text(ds: pydicom.Dataset, keyword: str, raw: bytes) -> str:
    """Text that is not plain ASCII, decoded by pydicom with the file's character set."""
    try:
        return str(ds.get(keyword, ""))
    except Exception:  # a broken SpecificCharacterSet must not stop ingest
        return raw.decode("latin-1").rstrip(" \x00")


def _truncation(elements: dict, file_size: int) -> str:
    """Why the file is incomplete: its last element runs past the end of the file."""
    if not elements:
        return ""
    last = elements[next(reversed(elements))]
    if not isinstance(last, RawDataElement) or last.length == UNDEFINED_LENGTH:
        return ""
    if last.value_tell + last.length <= file_size:
        return ""
    if last.tag == PIXEL_DATA:
        return "pixels"
    return "header"


@dataclass
class Frame:
    """One 2-D image of a series: a single-frame file or one frame of a multi-frame file."""

    path: Path
    frame: int | None
    position: np.ndarray  # ImagePositionPatient (LPS, mm)
    orientation: np.ndarray  # ImageOrientationPatient: row cosines, then column cosines
    spacing: tuple[float, float]  # PixelSpacing: between rows, between columns (mm)
    rows: int
    columns: int
    slope: float
    intercept: float


@dataclass
class SeriesFrames:
    frames: list[Frame] = field(default_factory=list)
    identity_keys: tuple[str, str] = ("", "")
    headers: dict[Path, Header] = field(default_factory=dict)


@dataclass
class DicomVolume:
    files: list[Path]
    frame_files: list[Path]  # the file of each axial plane, in volume order
    data: np.ndarray  # (X, Y, Z) float32, canonical RAS
    affine: np.ndarray  # (4, 4) RAS
    identity_keys: tuple[str, str]  # (PatientID, StudyInstanceUID): for the pseudonym only


def _has_dicom_prefix(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def scan_header(path: Path) -> Header | str | None:
    """Parses one file's header: a :class:`Header`, a one-line reason why a file that is
    DICOM cannot be used, or None when the file is not DICOM at all."""
    try:
        size = os.path.getsize(path)
        ds = pydicom.dcmread(path, defer_size=DEFER_SIZE)
    except OSError as exc:
        if isinstance(exc, PermissionError):
            return "cannot be read (permission denied)"
        return None if not _has_dicom_prefix(path) else f"cannot be read ({exc.strerror})"
    except Exception as exc:
        # pydicom raises many types (struct.error, BytesLengthException...) for damaged files:
        # a file with the DICOM prefix is a damaged DICOM file; anything else is not DICOM.
        if not _has_dicom_prefix(path):
            return None
        return f"damaged or truncated DICOM header (unreadable: {exc.__class__.__name__})"
    return Header.from_dataset(path, ds, size)


def read_header(path: Path) -> pydicom.Dataset | None:
    """The dataset with its pixel data deferred, or None when the file is not (usable) DICOM.

    Kept for callers that want pydicom's dataset; ingest uses :func:`scan_header`.
    """
    header = scan_header(path)
    return header.dataset if isinstance(header, Header) else None


def _as_header(path: Path, item: Header | pydicom.Dataset) -> Header:
    return item if isinstance(item, Header) else Header.from_dataset(path, item)


def is_dicomdir(path: Path, header: Header) -> bool:
    return path.name.upper().startswith("DICOMDIR") or header.media_class == (
        MEDIA_STORAGE_DIRECTORY
    )


def skip_reason(header: Header | pydicom.Dataset) -> str | None:
    """Why a DICOM object is not an MR slice stack a model should learn from, or None."""
    if isinstance(header, pydicom.Dataset):
        header = Header.from_dataset(Path(""), header)
    if header.truncated == "header":
        return "damaged or truncated DICOM header (the file ends inside it)"
    if "SOPClassUID" not in header and "Modality" not in header:
        return "damaged or truncated DICOM header (no SOPClassUID or Modality)"
    if "Modality" not in header:
        # Modality is mandatory in every DICOM object: without it the header is damaged.
        return "damaged or truncated DICOM header (no Modality)"
    modality = str(header.get("Modality", ""))
    if modality != "MR":
        return f"modality {modality} is not MR"
    if "Rows" not in header or "Columns" not in header:
        if str(header.get("SOPClassUID", "")) in MR_IMAGE_CLASSES:
            # Rows and Columns are mandatory in an MR image: the header lost its end.
            return "damaged or truncated DICOM header (an MR image without Rows/Columns)"
        return "not an image object (no Rows/Columns)"
    image_type = header.get("ImageType") or ()
    image_type = [
        str(v).upper() for v in (image_type if isinstance(image_type, tuple) else [image_type])
    ]
    description = " ".join(
        str(header.get(keyword, "")) for keyword in ("SeriesDescription", "ProtocolName")
    )
    if "LOCALIZER" in image_type or LOCALIZER_WORDS.search(description):
        return "localizer/scout, not a diagnostic slice stack"
    if any("PROJECTION" in v for v in image_type):
        return "projection image (MIP), not a slice"
    if int(header.get("SamplesPerPixel", 1)) != 1:
        return "colour image, not MR magnitude"
    return None


def _functional(ds: pydicom.Dataset, frame: int, sequence: str) -> pydicom.Dataset | None:
    """An item of a functional group macro: per-frame first, then shared."""
    for groups, index in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = ds.get(groups)
        if items and len(items) > index and sequence in items[index]:
            return items[index][sequence][0]
    return None


def _numbers(header: Header, keyword: str, count: int) -> np.ndarray:
    value = header.values.get(keyword)
    if value is _Unparsable:
        raise AmbientMedError(f"{keyword} is not numeric")
    values = value if isinstance(value, tuple) else (value,)
    if len(values) != count:
        raise AmbientMedError(f"{keyword} has {len(values)} values, expected {count}")
    return np.asarray(values, dtype=np.float64)


def _check_declared_size(header: Header, max_voxels: int) -> tuple[int, int, int]:
    """Rows, columns and frames the header declares, refused before any pixel is read when
    they exceed ``max_voxels`` or the pixel data cannot hold them."""
    try:
        rows, columns = int(header.get("Rows", 0)), int(header.get("Columns", 0))
        count = int(header.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise AmbientMedError("Rows/Columns/NumberOfFrames are not integers") from None
    if rows <= 0 or columns <= 0 or count <= 0:
        raise AmbientMedError(f"header declares an empty image ({rows}x{columns}x{count})")
    if rows * columns * count > max_voxels:
        raise AmbientMedError(
            f"header declares {rows}x{columns}x{count} voxels, over ingest.max_voxels={max_voxels}"
        )
    if header.pixel_length is not None and header.pixel_length != UNDEFINED_LENGTH:
        bits = int(header.get("BitsAllocated", 16) or 16)
        needed = -(-rows * columns * count * bits // 8)
        if header.pixel_length < needed:
            raise AmbientMedError(
                f"pixel data unreadable ({header.pixel_length} bytes for the {rows}x{columns}"
                f"x{count} {bits}-bit image the header declares)"
            )
    return rows, columns, count


def _frames(header: Header, max_voxels: int) -> list[Frame]:
    """The frames of a DICOM file with their geometry.

    Raises:
        AmbientMedError: no usable geometry, or an image larger than ``max_voxels``.
    """
    rows, columns, count = _check_declared_size(header, max_voxels)
    path = header.path
    if count > 1 and header.has_functional_groups:
        ds = header.dataset
        if "PerFrameFunctionalGroupsSequence" not in ds:
            raise AmbientMedError("multi-frame file without per-frame functional groups")
        frames = []
        for i in range(count):
            position = _functional(ds, i, "PlanePositionSequence")
            orientation = _functional(ds, i, "PlaneOrientationSequence")
            measures = _functional(ds, i, "PixelMeasuresSequence")
            transform = _functional(ds, i, "PixelValueTransformationSequence")
            if position is None or orientation is None:
                raise AmbientMedError("multi-frame file without per-frame plane position")
            frames.append(
                Frame(
                    path,
                    i,
                    np.asarray(position.ImagePositionPatient, dtype=np.float64),
                    np.asarray(orientation.ImageOrientationPatient, dtype=np.float64),
                    tuple(float(v) for v in (measures or ds).get("PixelSpacing", [1.0, 1.0])),
                    rows,
                    columns,
                    float((transform or ds).get("RescaleSlope", 1.0) or 1.0),
                    float((transform or ds).get("RescaleIntercept", 0.0) or 0.0),
                )
            )
        return frames
    if count > 1:
        raise AmbientMedError(
            f"multi-frame file ({count} frames) without functional groups (legacy multi-frame)"
        )
    if "ImagePositionPatient" not in header or "ImageOrientationPatient" not in header:
        raise AmbientMedError("no ImagePositionPatient/ImageOrientationPatient")
    spacing = (1.0, 1.0)
    if "PixelSpacing" in header:
        spacing = tuple(float(v) for v in _numbers(header, "PixelSpacing", 2))
    slope, intercept = header.get("RescaleSlope", 1.0), header.get("RescaleIntercept", 0.0)
    if not isinstance(slope, float | int) or not isinstance(intercept, float | int):
        raise AmbientMedError("RescaleSlope/RescaleIntercept are not single numbers")
    return [
        Frame(
            path,
            None,
            _numbers(header, "ImagePositionPatient", 3),
            _numbers(header, "ImageOrientationPatient", 6),
            spacing,
            rows,
            columns,
            float(slope or 1.0),
            float(intercept or 0.0),
        )
    ]


def frames_of(path: Path, ds: pydicom.Dataset, max_voxels: int = 2**62) -> list[Frame]:
    """The frames of a parsed DICOM file with their geometry (see :func:`_frames`)."""
    return _frames(Header.from_dataset(path, ds), max_voxels)


def group_series(
    headers: dict[Path, Header | pydicom.Dataset], max_voxels: int = 2**62
) -> tuple[dict[str, SeriesFrames], dict[Path, str]]:
    """Groups the frames of DICOM headers by SeriesInstanceUID.

    Args:
        headers: :func:`scan_header` results (or pydicom datasets) by file.
        max_voxels: a file whose header declares more voxels is skipped unread.

    Returns:
        (series by uid, skipped files with the reason a radiographer would accept).
    """
    series: dict[str, SeriesFrames] = defaultdict(SeriesFrames)
    skipped: dict[Path, str] = {}
    seen_instances: dict[str, Path] = {}
    for path, item in headers.items():
        header = _as_header(path, item)
        if is_dicomdir(path, header):
            skipped[path] = "DICOMDIR (a directory index, no image)"
            continue
        reason = skip_reason(header)
        if reason is None and "SeriesInstanceUID" not in header:
            reason = "no SeriesInstanceUID"
        sop = str(header.get("SOPInstanceUID", ""))
        if reason is None and sop in seen_instances:
            reason = (
                f"duplicate of the same instance (SOPInstanceUID) in '{seen_instances[sop].name}'"
            )
        if reason is None and not header.has_pixels:
            reason = "no PixelData"
        if reason is None:
            try:
                frames = _frames(header, max_voxels)
            except AmbientMedError as exc:
                reason = str(exc)
        if reason is not None:
            skipped[path] = reason
            continue
        seen_instances[sop] = path
        group = series[str(header.get("SeriesInstanceUID"))]
        group.frames.extend(frames)
        group.headers[path] = header
        group.identity_keys = (
            str(header.get("PatientID", "")),
            str(header.get("StudyInstanceUID", "")),
        )
    return dict(series), skipped


def _native_pixels(header: Header) -> np.ndarray | None:
    """Native pixel data straight from the file's bytes as ``(frames, rows, cols)``, or None
    when pydicom's decoders are needed (compressed, float, 1-bit, colour)."""
    if header.transfer_syntax not in NATIVE_SYNTAXES or header.pixel_length is None:
        return None
    bits = int(header.get("BitsAllocated", 0) or 0)
    stored = int(header.get("BitsStored", bits) or bits)
    if bits not in (8, 16, 32) or int(header.get("SamplesPerPixel", 1)) != 1:
        return None
    rows, columns = int(header.get("Rows")), int(header.get("Columns"))
    count = int(header.get("NumberOfFrames", 1) or 1)
    signed = int(header.get("PixelRepresentation", 0) or 0) == 1
    dtype = np.dtype(f"{'<' if header.little_endian else '>'}{'i' if signed else 'u'}{bits // 8}")
    items = rows * columns * count
    if header.pixel_bytes is not None:
        buffer = np.frombuffer(header.pixel_bytes, dtype=np.uint8)
    else:
        try:
            buffer = np.fromfile(
                header.path,
                dtype=np.uint8,
                count=items * dtype.itemsize,
                offset=header.pixel_offset,
            )
        except OSError as exc:
            raise AmbientMedError(
                f"'{header.path.name}': pixel data unreadable ({exc.strerror})"
            ) from None
    if buffer.size < items * dtype.itemsize:
        raise AmbientMedError(
            f"'{header.path.name}': pixel data unreadable (truncated: {buffer.size} of "
            f"{items * dtype.itemsize} bytes)"
        )
    pixels = buffer[: items * dtype.itemsize].view(dtype).reshape(count, rows, columns)
    if 0 < stored < bits:
        # Bits above BitsStored carry no value (PS3.5 8.1.1): shift them out, keeping the sign.
        shift = bits - stored
        pixels = (pixels.astype(dtype.newbyteorder("=")) << shift) >> shift
    return pixels


def _read_pixels(path: Path, header: Header | None = None) -> np.ndarray:
    """All frames of a file as ``(frames, rows, cols)`` (integer or float), MONOCHROME1
    already inverted so that, as in MONOCHROME2, higher values mean more signal."""
    if header is None:
        scanned = scan_header(path)
        if not isinstance(scanned, Header):
            raise AmbientMedError(f"'{path.name}': unreadable") from None
        header = scanned
    if not header.has_pixels:
        raise AmbientMedError(f"'{path.name}': no PixelData")
    if header.truncated == "pixels":
        raise AmbientMedError(f"'{path.name}': pixel data unreadable (the file is truncated)")
    pixels = _native_pixels(header)
    if pixels is None:
        try:
            pixels = header.dataset.pixel_array
        except Exception as exc:
            # One line, without pydicom's multi-line hints.
            detail = str(exc).splitlines()[0][:120] if str(exc) else exc.__class__.__name__
            raise AmbientMedError(f"'{path.name}': pixel data unreadable ({detail})") from None
        if pixels.ndim == 2:
            pixels = pixels[None]
    if str(header.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        pixels = pixels.astype(np.float32)
        bits = int(header.get("BitsStored", 16) or 16)
        if int(header.get("PixelRepresentation", 0) or 0) == 1:
            pixels = -1.0 - pixels
        else:
            pixels = float(2**bits - 1) - pixels
    return pixels


def _canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorders axes and flips to the closest canonical (RAS) orientation, as
    :func:`nibabel.as_closest_canonical` does, without copying the data."""
    ornt = io_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return data, affine
    return apply_orientation(data, ornt), affine @ inv_ornt_aff(ornt, data.shape)


def _volume(
    frames: list[Frame], pixels_of: dict[Path, np.ndarray], keys: tuple[str, str]
) -> DicomVolume:
    """A canonical RAS volume from frames already ordered along the normal."""
    first = frames[0]
    row_cos, col_cos = first.orientation[:3], first.orientation[3:]
    planes = np.empty((len(frames), first.rows, first.columns), dtype=np.float32)
    for k, f in enumerate(frames):
        planes[k] = pixels_of[f.path][f.frame or 0]
    slopes = np.array([f.slope for f in frames], dtype=np.float32)
    intercepts = np.array([f.intercept for f in frames], dtype=np.float32)
    if np.any(slopes != 1):
        planes *= slopes[:, None, None]
    if np.any(intercepts != 0):
        planes += intercepts[:, None, None]
    # Voxel (i, j, k) = column i, row j of the k-th plane along the normal.
    data = planes.transpose(2, 1, 0)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cos * first.spacing[1]
    affine_lps[:3, 1] = col_cos * first.spacing[0]
    if len(frames) > 1:
        affine_lps[:3, 2] = (frames[-1].position - frames[0].position) / (len(frames) - 1)
    else:
        affine_lps[:3, 2] = np.cross(row_cos, col_cos)
    affine_lps[:3, 3] = first.position
    data, affine = _canonical(data, LPS_TO_RAS @ affine_lps)
    return DicomVolume(
        files=sorted({f.path for f in frames}),
        frame_files=[f.path for f in frames],
        data=data,
        affine=affine,
        identity_keys=keys,
    )


def assemble_series(
    group: SeriesFrames, max_voxels: int
) -> tuple[list[DicomVolume], dict[Path, str]]:
    """Stacks one series into canonical RAS volumes.

    A file whose pixels cannot be decoded is dropped (and returned with its reason); the
    series is then split at any gap in the slice positions, so the rest is still used with
    correct geometry.

    Returns:
        (volumes, {dropped file: reason}).

    Raises:
        AmbientMedError: the whole series is unusable — inconsistent orientation, duplicate
            positions, differing slice sizes, or over ``max_voxels`` (checked before any
            pixel is read).
    """
    frames = group.frames
    first = frames[0]
    orientations = np.stack([f.orientation for f in frames])
    if not np.allclose(orientations, first.orientation, atol=1e-4):
        raise AmbientMedError("slices with inconsistent ImageOrientationPatient")
    sizes = {(f.rows, f.columns) for f in frames}
    if len(sizes) != 1:
        raise AmbientMedError(f"slices of different sizes {sorted(sizes)}")
    rows, cols = sizes.pop()
    if rows * cols * len(frames) > max_voxels:
        raise AmbientMedError(
            f"{len(frames)} slices of {rows}x{cols} exceed ingest.max_voxels={max_voxels}"
        )
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    along = np.stack([f.position for f in frames]) @ normal
    order = np.argsort(along, kind="stable")
    steps = np.diff(along[order])
    if len(frames) > 1 and np.min(steps) < 1e-3:
        raise AmbientMedError("two slices at the same position")
    spacing = float(np.median(steps)) if len(steps) else 0.0

    pixels_of: dict[Path, np.ndarray] = {}
    dropped: dict[Path, str] = {}
    for frame in frames:
        if frame.path in pixels_of or frame.path in dropped:
            continue
        try:
            pixels = _read_pixels(frame.path, group.headers.get(frame.path))
            if pixels.shape[1:] != (rows, cols):
                raise AmbientMedError(f"'{frame.path.name}': pixel data is not {rows}x{cols}")
            pixels_of[frame.path] = pixels
        except AmbientMedError as exc:
            dropped[frame.path] = str(exc)

    # Contiguous runs of decodable frames: a dropped or missing slice starts a new run.
    runs: list[list[int]] = []
    previous = None
    for idx in order:
        if frames[idx].path in dropped:
            previous = None
            continue
        gap = previous is not None and along[idx] - along[previous] > 1.5 * spacing
        if previous is None or gap:
            runs.append([])
        runs[-1].append(int(idx))
        previous = idx
    volumes = [_volume([frames[i] for i in run], pixels_of, group.identity_keys) for run in runs]
    return volumes, dropped

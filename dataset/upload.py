"""A light field uploaded by a person (the web demo): checked, decoded, and rewritten as a scene folder.

Accepted: one ``.zip`` of a scene folder in the Ref-UrbanLF layout (views ``<row>_<col>.png``, optional
``5_5_disparity.npy``; at any depth inside the archive), or loose files — the centre view plus its
neighbours (PNG/JPG named by the view pattern) and optionally a disparity ``.npy``. Nothing in an upload
is executed or trusted: archive members are read into memory (never extracted), with limits on their
number and sizes, and names that climb out of the archive (``..``, absolute paths) or symlinks are
refused; images are decoded by OpenCV only, arrays by ``np.load(allow_pickle=False)``; the scene folder
is written from the decoded pixels. Every problem is a :class:`UploadError` with a message for a person.
"""

from __future__ import annotations

import io
import lzma
import stat
import struct
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cv2
import numpy as np

from dataset.errors import DataError
from dataset.lightfield import LightFieldLayout, read_disparity
from utils.image_header import header_size
from utils.views import Offset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MIB = 1 << 20
#: What ``zipfile`` raises on an archive whose headers lie (names, sizes, offsets, checksums, methods,
#: encryption flags); :class:`UploadError` is not among them (a ``ValueError``, but raised by us).
ZIP_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    NotImplementedError,
    RuntimeError,
    OSError,
    OverflowError,
    struct.error,
)


def size_text(n: int) -> str:
    """A byte count for a person: ``"1.5 MiB"``, ``"800 KiB"`` or ``"120 bytes"``."""
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / 1024:.0f} KiB" if n >= 1024 else f"{n} bytes"


class UploadError(DataError):
    """An upload that is not a usable light field; the message says what to fix."""

    def __init__(self, problem: str) -> None:
        super().__init__(None, problem)


@dataclass(frozen=True)
class UploadLimits:
    """What one upload may hold."""

    max_total_bytes: int = 64 * MIB
    max_file_bytes: int = 16 * MIB
    max_files: int = 200
    max_side_px: int = 2048


@dataclass(frozen=True)
class UploadedScene:
    """The scene folder written from an upload, which views it has, and whether it came with a disparity."""

    scene_dir: Path
    offsets: tuple[Offset, ...]
    has_disparity: bool
    size_hw: tuple[int, int]


def _member_name(info: zipfile.ZipInfo) -> PurePosixPath:
    name = info.filename.replace("\\", "/")
    path = PurePosixPath(name)
    if name.startswith("/") or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise UploadError(f"the zip holds an unsafe path {info.filename!r} (absolute or with '..'): refused")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise UploadError(f"the zip holds a symbolic link {info.filename!r}: refused")
    return path


def _zip_problem(exc: BaseException) -> str:
    what = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, RuntimeError) and "encrypted" in what:
        what = "it is encrypted (password-protected zips are not accepted)"
    return what


def read_zip(data: bytes, limits: UploadLimits) -> dict[str, bytes]:
    """The image and ``.npy`` members of a zip (bytes) by file name; other members are ignored.

    Raises :class:`UploadError` for a corrupt archive (headers that disagree with the data: names, sizes,
    offsets, checksums, compression method, encryption), an unsafe member, or one over the limits.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except ZIP_ERRORS:
        raise UploadError("the .zip file is not a readable zip archive") from None
    with archive:
        infos = [i for i in archive.infolist() if not i.is_dir()]
        if len(infos) > limits.max_files:
            raise UploadError(f"the zip holds {len(infos)} files; at most {limits.max_files} are accepted")
        files: dict[str, bytes] = {}
        total = 0
        for info in infos:
            path = _member_name(info)
            if path.name.startswith(".") or "__MACOSX" in path.parts:
                continue
            if path.suffix.lower() not in (*IMAGE_SUFFIXES, ".npy"):
                continue
            if info.file_size > limits.max_file_bytes:
                raise UploadError(
                    f"{info.filename} is {size_text(info.file_size)}; at most "
                    f"{size_text(limits.max_file_bytes)} per file"
                )
            try:  # read at most the limit: a lying size header cannot bomb us
                with archive.open(info) as member:
                    content = member.read(limits.max_file_bytes + 1)
            except ZIP_ERRORS as exc:  # headers that disagree with the data
                raise UploadError(
                    f"the .zip file is damaged or its headers disagree with its contents: {info.filename}: "
                    f"{_zip_problem(exc)}"
                ) from None
            total += len(content)
            if len(content) > limits.max_file_bytes:
                raise UploadError(
                    f"{info.filename} unpacks to more than {size_text(limits.max_file_bytes)} per file "
                    f"(its header says {size_text(info.file_size)}): the zip's headers lie"
                )
            if total > limits.max_total_bytes:
                raise UploadError(f"the zip unpacks to more than {size_text(limits.max_total_bytes)}")
            if path.name in files:
                raise UploadError(f"the zip holds two files named {path.name}: keep one scene per zip")
            files[path.name] = content
    return files


def read_upload(paths: Sequence[str | Path], limits: UploadLimits = UploadLimits()) -> dict[str, bytes]:
    """Uploaded files (a single zip, or loose views / a disparity) -> their contents by file name."""
    if not paths:
        raise UploadError("nothing was uploaded")
    sizes = [Path(p).stat().st_size for p in paths]
    if sum(sizes) > limits.max_total_bytes:
        raise UploadError(
            f"the upload is {size_text(sum(sizes))}; at most {size_text(limits.max_total_bytes)}"
        )
    if len(paths) > limits.max_files:
        raise UploadError(f"{len(paths)} files uploaded; at most {limits.max_files}")
    zips = [Path(p) for p in paths if Path(p).suffix.lower() == ".zip"]
    if zips:
        if len(paths) > 1:
            raise UploadError("upload either one .zip of a scene folder or loose view files, not both")
        return read_zip(zips[0].read_bytes(), limits)
    files: dict[str, bytes] = {}
    for path, size in zip(map(Path, paths), sizes):
        if path.suffix.lower() not in (*IMAGE_SUFFIXES, ".npy"):
            raise UploadError(
                f"{path.name}: not a light-field file (expected .zip, .png, .jpg or a disparity .npy)"
            )
        if size > limits.max_file_bytes:
            raise UploadError(f"{path.name} is {size_text(size)}; at most {size_text(limits.max_file_bytes)}")
        files[path.name] = path.read_bytes()
    return files


def _check_size(name: str, width: int, height: int, limits: UploadLimits) -> None:
    if max(width, height) > limits.max_side_px:
        raise UploadError(f"{name} is {width}×{height} px; views up to {limits.max_side_px} px per side")


def check_header(name: str, content: bytes, limits: UploadLimits) -> None:
    """Refuse a view whose header states a size over ``limits.max_side_px``, before anything is decoded
    (a PNG/JPG header is read from its first bytes; other files are left to the decoder)."""
    size = header_size(content)
    if size is not None:
        _check_size(name, *size, limits)


def _decode_image(name: str, content: bytes, limits: UploadLimits) -> np.ndarray:
    check_header(name, content, limits)
    try:
        image = cv2.imdecode(np.frombuffer(content, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:  # e.g. a header OpenCV refuses
        image = None
    if image is None or image.ndim != 3:
        raise UploadError(f"{name} is not a decodable PNG/JPG image")
    _check_size(name, image.shape[1], image.shape[0], limits)  # a file the header reader did not know
    return image  # BGR, as cv2.imwrite wants it


def _view_names(layout: LightFieldLayout, radius: int = 4) -> dict[str, Offset]:
    offsets = [(r, c) for r in range(-radius, radius + 1) for c in range(-radius, radius + 1)]
    names: dict[str, Offset] = {}
    for offset in offsets:
        stem = PurePosixPath(layout.view_name(offset)).stem
        for suffix in IMAGE_SUFFIXES:
            names[stem + suffix] = offset
    return names


def write_uploaded_scene(
    files: dict[str, bytes],
    out_dir: Path,
    layout: LightFieldLayout,
    needed: Sequence[Offset] = (),
    limits: UploadLimits = UploadLimits(),
) -> UploadedScene:
    """Decode and check the files of an upload, then write them to ``out_dir`` as a scene folder.

    Args:
        files: contents by file name (:func:`read_upload`).
        out_dir: the scene folder to create (views as ``layout`` names them, disparity as
            ``layout.disparity_name``).
        layout: view and disparity names.
        needed: neighbour offsets the model reads (CAAM); missing ones are an error.

    Returns:
        :class:`UploadedScene`. Raises :class:`UploadError` naming what is missing or inconsistent.
    """
    names = _view_names(layout)
    views = {names[n]: (n, c) for n, c in files.items() if n in names}
    centre_name = layout.view_name((0, 0))
    if (0, 0) not in views:
        raise UploadError(
            f"no centre view {centre_name} in the upload: this is not a light field in the Ref-UrbanLF layout "
            f"(views named like {centre_name}, {layout.view_name((0, -1))}, ..., optional "
            f"{layout.disparity_name}); got {sorted(files)[:8] or 'no usable file'}"
        )
    missing = [layout.view_name(o) for o in needed if tuple(o) not in views]
    if missing:
        raise UploadError(
            f"missing views {', '.join(missing)}: this model aggregates the centre's neighbours"
        )
    for name, content in views.values():  # every size from its header first: nothing big is decoded
        check_header(name, content, limits)
    decoded = {o: _decode_image(n, c, limits) for o, (n, c) in views.items()}
    h, w = decoded[(0, 0)].shape[:2]
    for offset, image in decoded.items():
        if image.shape[:2] != (h, w):
            raise UploadError(
                f"views of different sizes: {views[offset][0]} is {image.shape[1]}×{image.shape[0]} px, the "
                f"centre view {views[(0, 0)][0]} is {w}×{h} px; every view must have the centre's size"
            )
    arrays = [n for n in files if n.lower().endswith(".npy")]
    if len(arrays) > 1 and layout.disparity_name in arrays:
        arrays = [layout.disparity_name]
    if len(arrays) > 1:
        raise UploadError(f"several .npy files ({', '.join(sorted(arrays))}): upload one disparity map")
    out_dir.mkdir(parents=True, exist_ok=True)
    has_disparity = bool(arrays)
    if has_disparity:
        raw = out_dir / "upload.npy"
        raw.write_bytes(files[arrays[0]])
        try:
            disparity = read_disparity(raw, (h, w))  # np.load(allow_pickle=False), shape and finiteness
        except DataError as exc:
            raise UploadError(f"{arrays[0]}: {exc.problem}") from None
        finally:
            raw.unlink()
        np.save(out_dir / layout.disparity_name, disparity)
    for offset, image in decoded.items():
        cv2.imwrite(str(out_dir / layout.view_name(offset)), image)
    return UploadedScene(out_dir, tuple(sorted(o for o in decoded if o != (0, 0))), has_disparity, (h, w))

"""Uploaded light fields (dataset/upload.py): good uploads become scene folders; bad ones get a message
for a person (UploadError), and nothing in an archive escapes it or is executed."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from dataset.lightfield import DEFAULT_LAYOUT, load_light_field
from dataset.upload import UploadError, UploadLimits, read_upload, read_zip, write_uploaded_scene
from utils.views import NEIGHBOURHOODS

FOUR = NEIGHBOURHOODS["4"]
H, W = 24, 32


def _png(value: int, hw: tuple[int, int] = (H, W)) -> bytes:
    image = np.full((*hw, 3), value, np.uint8)
    image[::3, ::2] = 255 - value  # some texture, so decoding is checked on real pixels
    return cv2.imencode(".png", image)[1].tobytes()


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def _views(prefix: str = "") -> dict[str, bytes]:
    names = [DEFAULT_LAYOUT.view_name((0, 0)), *(DEFAULT_LAYOUT.view_name(o) for o in FOUR)]
    return {prefix + n: _png(40 * i) for i, n in enumerate(names)}


def _zip(members: dict[str, bytes], symlink: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for name, content in members.items():
            z.writestr(name, content)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def test_zip_of_a_scene_folder_becomes_a_scene(tmp_path):
    disparity = np.linspace(-0.5, 1.5, H * W, dtype=np.float32).reshape(H, W)
    members = _views("Image7/") | {"Image7/5_5_disparity.npy": _npy(disparity), "Image7/notes.txt": b"x"}
    upload = tmp_path / "scene.zip"
    upload.write_bytes(_zip(members | {"__MACOSX/._5_5.png": b"junk"}))
    scene = write_uploaded_scene(read_upload([upload]), tmp_path / "out", DEFAULT_LAYOUT, FOUR)
    assert scene.has_disparity and scene.size_hw == (H, W) and set(scene.offsets) == set(FOUR)
    sample = load_light_field(scene.scene_dir, FOUR, DEFAULT_LAYOUT)
    assert np.array_equal(sample.disparity, disparity)
    want = cv2.cvtColor(
        cv2.imdecode(np.frombuffer(members["Image7/5_4.png"], np.uint8), 1), cv2.COLOR_BGR2RGB
    )
    assert np.array_equal(sample.views[0], want)  # pixels survive the decode / rewrite
    assert sorted(p.name for p in scene.scene_dir.iterdir()) == sorted(
        [*(n.split("/")[1] for n in _views("Image7/")), "5_5_disparity.npy"]
    )


def test_loose_views_without_disparity(tmp_path):
    paths = []
    for name, content in _views().items():
        (tmp_path / name.replace(".png", ".jpg" if name == "5_6.png" else ".png")).write_bytes(content)
        paths.append(tmp_path / name.replace(".png", ".jpg" if name == "5_6.png" else ".png"))
    scene = write_uploaded_scene(read_upload(paths), tmp_path / "out", DEFAULT_LAYOUT, FOUR)
    assert not scene.has_disparity and (scene.scene_dir / "5_6.png").is_file()  # a JPG view is accepted


@pytest.mark.parametrize(
    "members, message",
    [
        ({"../evil.png": b"x"}, "unsafe path '../evil.png'"),
        ({"/etc/evil.png": b"x"}, "unsafe path '/etc/evil.png'"),
        ({"a/5_5.png": _png(1), "b/5_5.png": _png(2)}, "two files named 5_5.png"),
        ({f"{i}.png": b"x" for i in range(9)}, "holds 9 files; at most 8"),
        ({"5_5.png": b"x" * 3000}, "5_5.png is 3 KiB; at most 2 KiB per file"),
    ],
)
def test_unsafe_or_oversized_zips_are_refused(members, message):
    limits = UploadLimits(max_files=8, max_file_bytes=2000)
    with pytest.raises(UploadError, match=message.replace("(", r"\(").replace(".", r"\.")):
        read_zip(_zip(members), limits)


def test_symlinks_and_corrupt_archives_are_refused(tmp_path):
    with pytest.raises(UploadError, match=r"symbolic link 'link\.png'"):
        read_zip(_zip(_views(), symlink="link.png"), UploadLimits())
    with pytest.raises(UploadError, match="not a readable zip archive"):
        read_zip(b"PK\x03\x04 not really", UploadLimits())
    bomb = tmp_path / "big.zip"  # 40 KiB of zeros compress to almost nothing; the total limit holds
    bomb.write_bytes(_zip({f"{i}.png": bytes(40_000) for i in range(3)}))
    with pytest.raises(UploadError, match="unpacks to more than"):
        read_upload([bomb], UploadLimits(max_total_bytes=100_000, max_file_bytes=50_000))
    with pytest.raises(UploadError, match=r"the upload is 445 bytes; at most 100 bytes"):
        read_upload([bomb], UploadLimits(max_total_bytes=100))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f.pop("5_5.png"), "no centre view 5_5.png in the upload: this is not a light field"),
        (lambda f: f.pop("4_5.png"), "missing views 4_5.png"),
        (
            lambda f: f.update({"5_4.png": _png(9, (H, W + 2))}),
            "views of different sizes: 5_4.png is 34×24 px",
        ),
        (lambda f: f.update({"5_6.png": b"GIF89a not an image"}), "5_6.png is not a decodable PNG/JPG image"),
        (lambda f: f.update({"5_5_disparity.npy": _npy(np.zeros((H, W + 1)))}), "does not match expected"),
        (
            lambda f: f.update({"5_5_disparity.npy": _npy(np.array([{"x": 1}], dtype=object), True)}),
            "cannot read disparity as a .npy array",
        ),
        (lambda f: f.update({"a.npy": _npy(np.zeros((H, W))), "b.npy": b""}), "several .npy files"),
    ],
)
def test_bad_light_fields_are_explained(tmp_path, change, message):
    files = _views()
    change(files)
    with pytest.raises(UploadError, match=message.replace(".", r"\.")):
        write_uploaded_scene(files, tmp_path / "out", DEFAULT_LAYOUT, FOUR)


def test_not_a_light_field_file_and_huge_views(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(UploadError, match=r"notes\.txt: not a light-field file"):
        read_upload([text])
    with pytest.raises(UploadError, match="nothing was uploaded"):
        read_upload([])
    files = {n: _png(7, (40, 60)) for n in _views()}
    with pytest.raises(UploadError, match="60×40 px; views up to 50 px per side"):
        write_uploaded_scene(files, tmp_path / "out", DEFAULT_LAYOUT, FOUR, UploadLimits(max_side_px=50))
    assert not Path(tmp_path / "out" / "5_5.png").exists()  # nothing written for a refused upload

"""Tests for ovss_cli.io: image discovery and decoding, atomic writes, output writers."""
from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from ovss_cli.errors import InputError
from ovss_cli.io.atomic import atomic_open, atomic_write_bytes, atomic_write_text
from ovss_cli.io.images import InputImage, iter_inputs, read_image
from ovss_cli.io.outputs import (
    class_colors,
    coco_annotation,
    coco_categories,
    encode_label_map,
    label_png_dtype,
    render_overlay,
    unlabelled_value,
    write_label_png,
    write_coco,
    write_jsonl,
    write_legend,
    write_rgb_png,
)
from ovss_cli.segmenter import UNLABELLED


def _gradient(height: int = 6, width: int = 8) -> np.ndarray:
    """A small RGB image with distinct, lossless-friendly values."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 30, ys * 40, (xs + ys) * 10], axis=2).astype(np.uint8)


def _check_rgb(array: np.ndarray, shape: tuple[int, int]) -> None:
    assert array.dtype == np.uint8
    assert array.shape == (*shape, 3)
    assert array.flags["C_CONTIGUOUS"]


# --------------------------------------------------------------------------- read_image


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = np.zeros((20, 40, 3), np.uint8)  # 20 rows x 40 columns as stored
    stored[:5, :5] = (255, 0, 0)  # red top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)

    image = read_image(path)
    _check_rgb(image, (40, 20))
    # Rotating clockwise moves the top-left corner to the top-right.
    assert image[1, -2, 0] > 200 and image[1, -2, 1] < 60
    assert image[1, 1, 0] < 60


def test_grayscale_rgba_and_palette(tmp_path: Path) -> None:
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    image = read_image(tmp_path / "gray.png")
    _check_rgb(image, (6, 8))
    assert np.array_equal(image, np.repeat(gray[:, :, None], 3, axis=2))

    rgb = _gradient()
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])  # nearly transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(read_image(tmp_path / "rgba.png"), rgb)  # alpha dropped, not composited

    palette_image = Image.new("P", (5, 4))
    palette_image.putpalette([0, 0, 0, 200, 10, 20, 30, 220, 40] + [0] * (256 * 3 - 9))
    palette_image.putpixel((1, 2), 1)
    palette_image.putpixel((3, 0), 2)
    palette_image.info["transparency"] = 0
    palette_image.save(tmp_path / "palette.png", transparency=0)
    image = read_image(tmp_path / "palette.png")
    _check_rgb(image, (4, 5))
    assert tuple(image[2, 1]) == (200, 10, 20)
    assert tuple(image[0, 3]) == (30, 220, 40)
    assert tuple(image[0, 0]) == (0, 0, 0)


def test_16_bit_grayscale_png_is_scaled_with_rounding(tmp_path: Path) -> None:
    values = np.array([[0, 257, 257 * 100, 65535], [128, 129, 257 * 254 + 129, 65534]], np.uint16)
    cv2.imwrite(str(tmp_path / "gray16.png"), values)
    with Image.open(tmp_path / "gray16.png") as opened:
        assert opened.mode.startswith("I;16")
    image = read_image(tmp_path / "gray16.png")
    _check_rgb(image, (2, 4))
    expected = np.array([[0, 1, 100, 255], [0, 1, 255, 255]], np.uint8)
    assert np.array_equal(image[:, :, 0], expected)
    assert np.array_equal(image[:, :, 0], image[:, :, 2])


def test_16_bit_rgb_png_and_tiff_are_scaled_not_truncated(tmp_path: Path) -> None:
    rgb8 = _gradient()
    # 257 * v + 200 truncates (>> 8) to v but rounds (/ 257) to v + 1 for v < 255.
    rgb16 = rgb8.astype(np.uint16) * 257 + np.where(rgb8 < 255, 200, 0).astype(np.uint16)
    expected = np.where(rgb8 < 255, rgb8.astype(np.int32) + 1, 255).astype(np.uint8)
    for name in ("rgb16.png", "rgb16.tif"):
        cv2.imwrite(str(tmp_path / name), rgb16[:, :, ::-1])  # cv2 writes BGR
        image = read_image(tmp_path / name)
        _check_rgb(image, rgb8.shape[:2])
        assert np.array_equal(image, expected), name


@pytest.mark.parametrize("suffix", [".bmp", ".tif", ".webp"])
def test_other_formats_round_trip(tmp_path: Path, suffix: str) -> None:
    rgb = _gradient()
    path = tmp_path / f"image{suffix}"
    options = {"lossless": True} if suffix == ".webp" else {}
    Image.fromarray(rgb).save(path, **options)
    image = read_image(path)
    _check_rgb(image, rgb.shape[:2])
    assert np.array_equal(image, rgb)


def test_unreadable_files_raise_input_error_naming_the_file(tmp_path: Path) -> None:
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        good, "JPEG"
    )
    (tmp_path / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (tmp_path / "text.png").write_text("this is not a PNG\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    for name in ("truncated.jpg", "text.png", "empty.jpg", "folder.png", "missing.png"):
        with pytest.raises(InputError) as caught:
            read_image(tmp_path / name)
        message = str(caught.value)
        assert name in message and message.startswith("cannot read image")
        assert "\n" not in message


def test_decompression_bomb_is_an_input_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.fromarray(_gradient(20, 20)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 400 px > 2 x 50 -> error
    with pytest.raises(InputError, match="big.png"):
        read_image(tmp_path / "big.png")


# --------------------------------------------------------------------------- iter_inputs


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_iter_inputs_walks_directories_sorted_and_filtered(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for rel in ("b.jpg", "a.PNG", "notes.txt", "sub/z.webp", "sub/c.tiff", "sub/deeper/d.bmp",
                ".hidden.jpg", ".cache/e.jpg", "sub/.git/f.png"):
        _touch(root / rel)
    found = list(iter_inputs([str(root)]))
    assert [item.rel.as_posix() for item in found] == [
        "a.PNG", "b.jpg", "sub/c.tiff", "sub/deeper/d.bmp", "sub/z.webp"
    ]
    assert all(item.path == root / item.rel for item in found)


def test_sibling_folders_differing_only_in_case_get_distinct_output_folders(tmp_path: Path) -> None:
    """Sub/x.jpg and sub/x.jpg would write the same label file on a case-insensitive disk."""
    root = tmp_path / "data"
    for rel in ("Sub/x.jpg", "sub/x.jpg", "sub/y.jpg", "sub/deep/z.jpg", "other/x.jpg"):
        _touch(root / rel)
    found = list(iter_inputs([str(root)]))
    assert [(item.path.relative_to(root).as_posix(), item.rel.as_posix()) for item in found] == [
        ("Sub/x.jpg", "Sub/x.jpg"), ("other/x.jpg", "other/x.jpg"), ("sub/deep/z.jpg", "sub_2/deep/z.jpg"),
        ("sub/x.jpg", "sub_2/x.jpg"), ("sub/y.jpg", "sub_2/y.jpg")]


def test_iter_inputs_files_stdin_and_rel_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _touch(tmp_path / "in/x.jpg")
    _touch(tmp_path / "in/readme.txt")
    _touch(tmp_path / "dir2/y.png")
    _touch(tmp_path / "other/w.png")
    stdin = io.StringIO("in/x.jpg\n\n   \ndir2\n")
    found = list(iter_inputs(["in/readme.txt", str(tmp_path / "other/w.png"), "-"], stdin=stdin))
    assert [item.rel.as_posix() for item in found] == ["in/readme.txt", "w.png", "in/x.jpg", "y.png"]
    assert found[0].path == Path("in/readme.txt")  # explicit non-image files are still yielded
    # A path with ".." keeps only its file name.
    (tmp_path / "in/sub").mkdir()
    monkeypatch.chdir(tmp_path / "in/sub")
    assert [item.rel for item in iter_inputs(["../x.jpg"])] == [Path("x.jpg")]


def test_iter_inputs_missing_path_is_an_input_error(tmp_path: Path) -> None:
    _touch(tmp_path / "a.jpg")
    with pytest.raises(InputError, match="input not found: .*nope.jpg"):
        next(iter_inputs([str(tmp_path / "a.jpg"), str(tmp_path / "nope.jpg")]))
    stream = iter_inputs(["-"], stdin=io.StringIO(f"{tmp_path / 'a.jpg'}\n{tmp_path / 'gone.png'}\n"))
    assert next(stream).rel == Path("a.jpg")  # stdin paths are checked as they arrive
    gone = next(stream)  # a vanished stdin path is that input's failure, not the run's
    assert gone.rel == Path("gone.png") and gone.error == f"input not found: {tmp_path / 'gone.png'}"
    assert next(stream, None) is None


def test_iter_inputs_deduplicates_relative_paths(tmp_path: Path) -> None:
    for folder in ("one", "two", "three"):
        _touch(tmp_path / folder / "img.jpg")
    _touch(tmp_path / "one/img_2.jpg")
    args = [str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "three/img.jpg")]
    rels = [item.rel.as_posix() for item in iter_inputs(args)]
    assert rels == ["img.jpg", "img_2.jpg", "img_3.jpg", "img_4.jpg"]
    assert rels == [item.rel.as_posix() for item in iter_inputs(args)]  # deterministic


def test_iter_inputs_streams(tmp_path: Path) -> None:
    _touch(tmp_path / "a.jpg")

    def lines():
        yield str(tmp_path / "a.jpg") + "\n"
        raise AssertionError("read past the first image before it was consumed")

    stream = iter_inputs(["-"], stdin=lines())  # type: ignore[arg-type]
    assert next(stream) == InputImage(tmp_path / "a.jpg", Path("a.jpg"))


# --------------------------------------------------------------------------- atomic writes


def test_atomic_writes_replace_and_leave_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "deep/er/out.json"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second ✓")
    assert target.read_text(encoding="utf-8") == "second ✓"
    atomic_write_bytes(tmp_path / "blob.bin", b"\x00\x01")
    assert (tmp_path / "blob.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_atomic_open_does_not_clobber_on_exception(tmp_path: Path) -> None:
    target = tmp_path / "keep.txt"
    target.write_text("original")
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w") as handle:
            handle.write("partial")
            handle.flush()
            assert len(list(tmp_path.glob(".keep.txt.*.tmp"))) == 1
            raise RuntimeError("boom")
    assert target.read_text() == "original"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


# --------------------------------------------------------------------------- label PNGs, legend


def test_label_png_switches_to_16_bit_after_255_classes(tmp_path: Path) -> None:
    assert label_png_dtype(255) == np.uint8 and label_png_dtype(256) == np.uint16
    assert unlabelled_value(np.uint8) == 255 and unlabelled_value(np.uint16) == 65535

    labels8 = np.array([[0, 254], [UNLABELLED, 3]], np.int32)
    write_label_png(tmp_path / "l8.png", labels8, 255)
    back = cv2.imread(str(tmp_path / "l8.png"), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint8 and back.ndim == 2
    assert back.tolist() == [[0, 254], [255, 3]]

    labels16 = np.array([[0, 255], [UNLABELLED, 300]], np.int32)
    write_label_png(tmp_path / "l16.png", labels16, 301)
    back = cv2.imread(str(tmp_path / "l16.png"), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and back.ndim == 2
    assert back.tolist() == [[0, 255], [65535, 300]]

    with pytest.raises(ValueError):
        encode_label_map(np.array([[255]]), 255)
    with pytest.raises(ValueError):
        encode_label_map(np.array([[-2]]), 10)


def test_legend_json(tmp_path: Path) -> None:
    path = tmp_path / "classes.json"
    write_legend(path, ["cat", "dog"], [["cat", "kitten"], ["dog"]], np.uint8, extra={"method": "san"})
    legend = json.loads(path.read_text())
    colors = class_colors(2).tolist()
    assert legend["classes"] == [
        {"id": 0, "name": "cat", "names": ["cat", "kitten"], "color": colors[0]},
        {"id": 1, "name": "dog", "names": ["dog"], "color": colors[1]},
    ]
    assert legend["unlabelled"] == 255 and legend["png_dtype"] == "uint8"
    assert legend["method"] == "san"
    write_legend(path, ["a"] * 300, None, label_png_dtype(300))
    legend = json.loads(path.read_text())
    assert legend["unlabelled"] == 65535 and legend["png_dtype"] == "uint16"
    assert legend["classes"][5]["names"] == ["a"]


def test_class_colors_are_distinct_and_stable() -> None:
    colors = class_colors(300)
    assert colors.shape == (300, 3) and colors.dtype == np.uint8
    assert len({tuple(c) for c in colors.tolist()}) == 300
    assert not (colors == 0).all(axis=1).any()
    assert np.array_equal(colors[:20], class_colors(20))


# --------------------------------------------------------------------------- overlay


def test_overlay_blends_labelled_pixels_only(tmp_path: Path) -> None:
    image = np.full((200, 300, 3), 90, np.uint8)
    labels = np.full((200, 300), UNLABELLED, np.int32)
    labels[:, :150] = 0
    labels[120:, 150:] = 1
    overlay = render_overlay(image, labels, ["sky", "grass"])
    assert overlay.shape == image.shape and overlay.dtype == np.uint8
    unlabelled = labels == UNLABELLED
    assert np.array_equal(overlay[unlabelled], image[unlabelled])
    for class_index in (0, 1):
        assert (overlay[labels == class_index] != image[labels == class_index]).any(axis=1).all()
    # Text was drawn: some white pixels inside the big left region.
    assert (overlay[:, :150] == 255).all(axis=2).any()
    # A plain blended pixel far from borders and text has the exact blend value.
    expected = np.rint(0.5 * 90 + 0.5 * class_colors(2)[1].astype(float)).astype(np.uint8)
    assert np.array_equal(overlay[125, 155], expected)
    # Pixels on a region border (here: first row of "grass" below unlabelled) are darker.
    assert (overlay[120, 200].astype(int) < expected.astype(int)).all()
    write_rgb_png(tmp_path / "overlay.png", overlay)
    back = cv2.cvtColor(cv2.imread(str(tmp_path / "overlay.png")), cv2.COLOR_BGR2RGB)
    assert np.array_equal(back, overlay)


def test_overlay_skips_names_for_tiny_regions() -> None:
    image = np.zeros((60, 60, 3), np.uint8)
    labels = np.full((60, 60), UNLABELLED, np.int32)
    labels[10:13, 10:13] = 0
    overlay = render_overlay(image, labels, ["a very long class name"])
    changed = (overlay != image).any(axis=2)
    assert np.array_equal(changed, labels == 0)


# --------------------------------------------------------------------------- COCO results


# pycocotools' decode trips a numpy 2 deprecation inside the library; not ours to fix.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_coco_results(tmp_path: Path) -> None:
    first = np.zeros((10, 12), bool)
    first[2:5, 3:9] = True  # 18 px, bbox x=3 y=2 w=6 h=3
    second = np.zeros((7, 5), bool)
    second[0, 0] = second[6, 4] = True  # 2 px, bbox spans the image
    with pytest.raises(ValueError):
        coco_annotation(2, first, 0.5, num_classes=2)
    with pytest.raises(ValueError):
        coco_annotation(0, first, float("nan"), num_classes=2)
    entries = [
        ({"file_name": "a.jpg", "height": 10, "width": 12}, [coco_annotation(1, first, 0.9, 2)]),
        ({"file_name": "sub/b.png", "height": 7, "width": 5}, [coco_annotation(0, second, np.float32(0.25), 2)]),
        ({"file_name": "c.jpg", "height": 10, "width": 12}, [coco_annotation(0, ~first, 0.5, 2)]),
    ]
    path = tmp_path / "coco/results.json"
    write_coco(path, coco_categories(["cat", "dog"], [["cat"], ["dog", "puppy"]]), lambda: iter(entries))
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp file left
    first_bytes = path.read_bytes()
    write_coco(path, coco_categories(["cat", "dog"], [["cat"], ["dog", "puppy"]]), lambda: iter(entries))
    assert path.read_bytes() == first_bytes  # same entries, same bytes

    coco = COCO(str(path))
    assert sorted(coco.getImgIds()) == [1, 2, 3]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["cat", "dog"]
    anns = coco.loadAnns([1, 2, 3])
    assert [ann["category_id"] for ann in anns] == [2, 1, 1] and [ann["image_id"] for ann in anns] == [1, 2, 3]
    assert anns[0]["area"] == 18 and anns[0]["bbox"] == [3, 2, 6, 3]
    assert anns[1]["area"] == 2 and anns[1]["bbox"] == [0, 0, 5, 7]
    assert anns[2]["area"] == 120 - 18
    assert anns[1]["score"] == pytest.approx(0.25) and anns[0]["iscrowd"] == 0
    assert np.array_equal(coco.annToMask(anns[0]).astype(bool), first)
    assert np.array_equal(mask_utils.decode(anns[1]["segmentation"]).astype(bool), second)

    results = coco.loadRes(json.loads(path.read_text())["annotations"])
    assert len(results.getAnnIds()) == 3
    assert np.array_equal(results.annToMask(results.loadAnns(3)[0]).astype(bool), ~first)


def test_write_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    write_jsonl(path, iter([{"image": "a.jpg", "ok": True, "x": np.float32(0.5)}, {"image": "b.jpg", "ok": False}]))
    lines = path.read_text().splitlines()
    assert [json.loads(line)["image"] for line in lines] == ["a.jpg", "b.jpg"]
    assert json.loads(lines[0])["x"] == 0.5

    def failing():
        yield {"image": "c.jpg"}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_jsonl(path, failing())
    assert [json.loads(line)["image"] for line in path.read_text().splitlines()] == ["a.jpg", "b.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl"]

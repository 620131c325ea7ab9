"""`ovss segment` end to end through the CLI, with small seeded models passed as --weights."""
from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from typer.testing import CliRunner

from ovss_cli import load_segmenter
from ovss_cli.cli import app
from ovss_cli.io.images import read_image

CLASSES = "cat,person,cup,rocket,sky"


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(app, list(args), input=input)


def sample_files(sample_images: Path) -> list[Path]:
    return sorted(p for p in sample_images.iterdir() if p.suffix in {".png", ".jpg"})


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, seeded_san, sample_images):
    out = tmp_path_factory.mktemp("run")
    result = invoke("segment", str(sample_images), "--classes", CLASSES, "--weights", str(seeded_san),
                    "--out", str(out), "--batch-size", "2", "--device", "cpu", "--distractors", "none")
    return result, out


def test_help_lists_the_commands():
    proc = subprocess.run([sys.executable, "-m", "ovss_cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("segment", "evaluate", "train-san", "compare", "models", "datasets"):
        assert command in proc.stdout


def test_run_succeeds_and_writes_every_format(full_run, sample_images):
    result, out = full_run
    assert result.exit_code == 0, result.output
    assert "5 ok, 0 failed" in result.output
    for f in sample_files(sample_images):
        h, w = read_image(f).shape[:2]
        label = cv2.imread(str(out / "labels" / f"{f.stem}.png"), cv2.IMREAD_UNCHANGED)
        assert label.dtype == np.uint8 and label.shape == (h, w)
        assert set(np.unique(label)) <= set(range(5))  # SAN labels every pixel
        overlay = np.asarray(Image.open(out / "overlays" / f"{f.stem}.png"))
        assert overlay.shape == (h, w, 3)
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.part"))


def test_label_png_equals_library_prediction(full_run, seeded_san, sample_images):
    _, out = full_run
    segmenter = load_segmenter("san", weights=str(seeded_san), device="cpu")
    f = sample_images / "cat.png"
    pred = segmenter.predict(read_image(f), CLASSES.split(","))
    label = cv2.imread(str(out / "labels" / "cat.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(label, pred.labels.astype(np.uint8))


def test_legend(full_run):
    _, out = full_run
    legend = json.loads((out / "classes.json").read_text())
    assert [c["name"] for c in legend["classes"]] == CLASSES.split(",")
    assert [c["id"] for c in legend["classes"]] == [0, 1, 2, 3, 4]
    assert legend["unlabelled"] == 255


def test_coco_json_loads_and_matches_labels(full_run, sample_images):
    _, out = full_run
    coco = COCO(str(out / "coco.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CLASSES.split(",")
    images = {img["file_name"]: img for img in coco.loadImgs(coco.getImgIds())}
    assert set(images) == {f.name for f in sample_files(sample_images)}
    for name, img in images.items():
        label = cv2.imread(str(out / "labels" / (Path(name).stem + ".png")), cv2.IMREAD_UNCHANGED)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        assert sorted(a["category_id"] - 1 for a in anns) == sorted(np.unique(label).tolist())
        for a in anns:
            m = mask_utils.decode(a["segmentation"]).astype(bool)
            assert np.array_equal(m, label == a["category_id"] - 1)
            assert a["area"] == m.sum()
            assert 0.0 <= a["score"] <= 1.0
    results = coco.loadRes(json.loads((out / "coco.json").read_text())["annotations"])
    assert len(results.getAnnIds()) == len(coco.getAnnIds())


def test_jsonl_manifest(full_run, sample_images):
    _, out = full_run
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [Path(r["input"]).name for r in lines] == [f.name for f in sample_files(sample_images)]
    for r in lines:
        assert r["ok"] is True and "seconds" not in r  # deterministic: a resumed run writes the same bytes
        assert (out / r["outputs"]["png"]).is_file() and (out / r["outputs"]["overlay"]).is_file()
        assert abs(sum(c["fraction"] for c in r["classes"]) - 1.0) < 1e-4
        assert {c["name"] for c in r["classes"]} <= set(CLASSES.split(","))


def test_official_tiny_checkpoint_with_clip_config(tmp_path, reference_dir):
    fixture = torch.load(reference_dir / "san" / "tiny-seed0.fixture.pth", weights_only=True)
    config = tmp_path / "tiny-clip.json"
    config.write_text(json.dumps(fixture["clip_config"]))
    image = tmp_path / "in" / "fixture.png"
    image.parent.mkdir()
    Image.fromarray(fixture["image_rgb_uint8"].permute(1, 2, 0).numpy()).save(image)
    result = invoke("segment", str(image.parent), "--classes", ",".join(fixture["vocabulary"]),
                    "--weights", str(reference_dir / "san" / "tiny-seed0.weights.pth"),
                    "--clip-config", str(config), "--resize-short", "0", "--format", "png", "--out", str(tmp_path / "o"),
                    "--quiet", "--distractors", "none")
    assert result.exit_code == 0, result.output
    label = cv2.imread(str(tmp_path / "o" / "labels" / "fixture.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(label, fixture["sem_seg"].argmax(0).numpy().astype(np.uint8))
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [".ovss", "classes.json", "labels"]


def test_stdin_paths_and_formats(tmp_path, seeded_san, sample_images):
    paths = "\n".join(str(sample_images / n) for n in ("cat.png", "rocket.jpg")) + "\n"
    result = invoke("segment", "-", "--classes", "cat,rocket", "--weights", str(seeded_san), "--out", str(tmp_path),
                    "--format", "png,jsonl", "--quiet", input=paths)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == ["cat.png", "rocket.png"]
    assert not (tmp_path / "overlays").exists() and not (tmp_path / "coco.json").exists()
    assert len((tmp_path / "manifest.jsonl").read_text().splitlines()) == 2


# --- bad inputs: one clear line, the right exit code, no traceback -----------------------


def assert_clean_error(result, code: int, *fragments: str):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for fragment in fragments:
        assert fragment in text, result.output


def test_missing_input(tmp_path, seeded_san):
    result = invoke("segment", str(tmp_path / "nope"), "--classes", "cat", "--weights", str(seeded_san))
    assert_clean_error(result, 3, "input not found", str(tmp_path / "nope"))


def test_bad_image_is_reported_and_others_finish(tmp_path, seeded_san, sample_images):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes((sample_images / "cat.png").read_bytes())
    (folder / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (folder / "c.png").write_bytes((sample_images / "coffee.png").read_bytes()[:2000])  # truncated
    (folder / "d.jpg").write_bytes((sample_images / "rocket.jpg").read_bytes())
    out = tmp_path / "out"
    result = invoke("segment", str(folder), "--classes", "cat,cup", "--weights", str(seeded_san), "--out", str(out),
                    "--batch-size", "2")
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "b.jpg" in result.output and "c.png" in result.output
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["a.png", "d.png"]
    records = {Path(r["input"]).name: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert records["a.png"]["ok"] and records["d.jpg"]["ok"]
    assert not records["b.jpg"]["ok"] and "cannot read image" in records["b.jpg"]["error"]
    assert not records["c.png"]["ok"] and str(folder / "c.png") in records["c.png"]["error"]
    assert len(COCO(str(out / "coco.json")).getImgIds()) == 2


@pytest.mark.parametrize(
    "classes,fragment",
    [("", "empty"), ("cat, ,sofa", "entry 2 is empty"), ("cat,sofa,cat", "duplicate class name 'cat'"), ("   ", "empty")],
)
def test_bad_vocabulary(tmp_path, seeded_san, sample_images, classes, fragment):
    result = invoke("segment", str(sample_images), "--classes", classes, "--weights", str(seeded_san))
    assert_clean_error(result, 2, fragment)


def test_missing_classes_file(tmp_path, sample_images):
    result = invoke("segment", str(sample_images), "--classes-file", str(tmp_path / "c.txt"))
    assert_clean_error(result, 2, "classes file not found", str(tmp_path / "c.txt"))


def test_missing_checkpoint(tmp_path, sample_images):
    result = invoke("segment", str(sample_images), "--classes", "cat", "--weights", str(tmp_path / "w.pth"))
    assert_clean_error(result, 4, "checkpoint not found", str(tmp_path / "w.pth"))


def test_corrupt_checkpoint(tmp_path, seeded_san, sample_images):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(seeded_san.read_bytes()[:5000])
    result = invoke("segment", str(sample_images), "--classes", "cat", "--weights", str(bad))
    assert_clean_error(result, 4, str(bad), "not a readable checkpoint")


def test_checkpoint_that_is_not_san(tmp_path, sample_images):
    other = tmp_path / "other.pth"
    torch.save({"model": {"foo.weight": torch.zeros(3)}}, other)
    result = invoke("segment", str(sample_images), "--classes", "cat", "--weights", str(other))
    assert_clean_error(result, 4, str(other), "does not match san-vit-b16", "missing keys")


def test_offline_download_names_url_and_path(tmp_path, sample_images, monkeypatch):
    import socket

    from ovss_cli import zoo

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    entry = zoo.ZOO["san-vit-b16"]
    monkeypatch.setitem(zoo.ZOO, "san-vit-b16",
                        dataclasses.replace(entry, source=zoo.UrlFile(f"http://127.0.0.1:{port}/san_vit_b_16.pth")))
    monkeypatch.setenv("OVSS_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = invoke("segment", str(sample_images), "--classes", "cat", "--quiet")
    expected_path = tmp_path / "weights" / "san-vit-b16" / "san_vit_b_16.pth"
    assert_clean_error(result, 4, "cannot download san-vit-b16", f"127.0.0.1:{port}", str(expected_path))


@pytest.mark.parametrize("args,code,fragment", [
    (["--format", "png,gif"], 2, "unknown --format 'gif'"),
    (["--method", "magic"], 2, "unknown method 'magic'"),
    (["--device", "tpu"], 2, "unknown device 'tpu'"),
    (["--templates", "nope"], 2, "unknown template set 'nope'"),
])
def test_bad_options(seeded_san, sample_images, args, code, fragment):
    result = invoke("segment", str(sample_images), "--classes", "cat", "--weights", str(seeded_san), *args)
    assert_clean_error(result, code, fragment)


def test_bad_clip_config(tmp_path, sample_images, reference_dir):
    bad = tmp_path / "clip.json"
    bad.write_text("{not json")
    weights = str(reference_dir / "san" / "tiny-seed0.weights.pth")
    result = invoke("segment", str(sample_images), "--classes", "cat", "--weights", weights, "--clip-config", str(bad))
    assert_clean_error(result, 2, "cannot read CLIP config", str(bad))
    result = invoke("segment", str(sample_images), "--classes", "cat", "--weights", weights,
                    "--clip-config", str(tmp_path / "missing.json"))
    assert_clean_error(result, 2, "CLIP config not found")


def test_debug_shows_the_traceback(tmp_path, sample_images):
    result = invoke("--debug", "segment", str(sample_images), "--classes", "cat", "--weights", str(tmp_path / "w.pth"))
    assert result.exit_code == 4
    assert "Traceback" in result.output


def test_models_lists_the_zoo():
    result = invoke("models")
    assert result.exit_code == 0
    assert "san-vit-b16" in result.output and "san-vit-l14" in result.output


def test_more_than_255_classes_give_uint16_labels(tmp_path, seeded_san, sample_images):
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(f"thing{i}" for i in range(300)) + "\n")
    result = invoke("segment", str(sample_images / "cat.png"), "--classes-file", str(classes), "--weights",
                    str(seeded_san), "--out", str(tmp_path / "o"), "--format", "png", "--quiet", "--distractors", "none")
    assert result.exit_code == 0, result.output
    label = cv2.imread(str(tmp_path / "o" / "labels" / "cat.png"), cv2.IMREAD_UNCHANGED)
    assert label.dtype == np.uint16 and label.max() < 300
    assert json.loads((tmp_path / "o" / "classes.json").read_text())["unlabelled"] == 65535

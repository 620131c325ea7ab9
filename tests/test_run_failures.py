"""What a run does when parts of it fail: every failure is that input's, reported, and the run
goes on; nothing that looks finished is published for a run that did not finish; a run with
nothing to do says what it found."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import build_layout, random_image, write_image
from ovss_cli import load_segmenter
from ovss_cli.cli import app
from ovss_cli.datasets import open_dataset
from ovss_cli.errors import InputError
from ovss_cli.evaluate import evaluate_dataset
from ovss_cli.io.images import InputWalk
from ovss_cli.segment import segment_images
from ovss_cli.vocabulary import parse_class_list

REPO = Path(__file__).resolve().parents[1]


def ovss(*args: str, input: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (progress bars and all)."""
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "ovss_cli", *args], input=input, capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def records(out: Path) -> dict[str, dict]:
    return {Path(r["input"]).name: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


# --- evaluate --------------------------------------------------------------------------------


@pytest.fixture
def voc_with_an_empty_image(tmp_path):
    """20 small samples of which one image is an empty file."""
    root = tmp_path / "data"
    ids = [f"s{i:02d}" for i in range(20)]
    build_layout(root, "voc20", ids, size=(16, 20))
    (root / "VOC2012" / "JPEGImages" / "s07.jpg").write_bytes(b"")
    return root


def test_evaluate_reports_an_unreadable_image_with_progress_on_and_scores_the_rest(voc_with_an_empty_image,
                                                                                   seeded_san, tmp_path):
    out = tmp_path / "eval"
    proc = ovss("evaluate", "--dataset", "voc20", "--data-root", str(voc_with_an_empty_image), "--weights",
                str(seeded_san), "--resize-short", "0", "--out", str(out))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "s07.jpg" in proc.stderr and "file is empty" in proc.stderr  # the progress bar's line
    assert "partial" in proc.stdout  # the table says so
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 19 and metrics["failed"] == 1 and metrics["partial"] is True
    assert [Path(f["input"]).name for f in metrics["failures"]] == ["s07.jpg"]
    assert metrics["metrics"]["mIoU"] is not None


def test_evaluate_strict_stops_at_the_first_failure(voc_with_an_empty_image, seeded_san, tmp_path):
    result = CliRunner().invoke(app, ["evaluate", "--dataset", "voc20", "--data-root", str(voc_with_an_empty_image),
                                      "--weights", str(seeded_san), "--resize-short", "0", "--out",
                                      str(tmp_path / "eval"), "--strict", "--quiet"])
    assert result.exit_code == 3, result.output
    assert "s07.jpg" in result.output and "--strict" in result.output
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_a_failed_prediction_save_is_that_samples_failure(tmp_path, seeded_san, monkeypatch):
    from ovss_cli import evaluate as evaluate_module

    build_layout(tmp_path / "data", "voc20", ["a", "b", "c"], size=(16, 20))
    dataset = open_dataset("voc20", tmp_path / "data")
    real = evaluate_module.write_label_png

    def failing_for_b(path, labels, num_values):
        if Path(path).stem == "b":
            raise RuntimeError("disk said no")
        real(path, labels, num_values)

    monkeypatch.setattr(evaluate_module, "write_label_png", failing_for_b)
    segmenter = load_segmenter("san", weights=str(seeded_san), resize_short=None)
    result = evaluate_dataset(segmenter, dataset, predictions_dir=tmp_path / "pred")
    assert result.images == 2 and result.failed == 1 and result.partial
    assert result.failures[0][0].endswith("b.jpg") and "disk said no" in result.failures[0][1]
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["a.png", "c.png"]
    # the failed sample is not in the metrics: the confusion matrix holds exactly a and c
    only = evaluate_dataset(segmenter, open_dataset("voc20", tmp_path / "data"), limit=None)
    assert result.confusion.matrix.sum() == only.confusion.matrix.sum() * 2 // 3


# --- segment: failures are per input -----------------------------------------------------------


def test_a_vanished_stdin_path_is_that_inputs_failure(tmp_path, seeded_san):
    write_image(tmp_path / "a.jpg", 1, (20, 24))
    write_image(tmp_path / "b.png", 2, (20, 24))
    out = tmp_path / "out"
    proc = ovss("segment", "-", "--classes", "cat,sofa", "--weights", str(seeded_san), "--out", str(out),
                "--quiet", input="a.jpg\nmissing.jpg\nb.png\n", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "missing.jpg: input not found" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["a.png", "b.png"]
    got = records(out)
    assert got["a.jpg"]["ok"] and got["b.png"]["ok"] and not got["missing.jpg"]["ok"]
    assert list(got) == ["a.jpg", "missing.jpg", "b.png"]  # input order


def test_an_unlistable_subfolder_is_that_inputs_failure(tmp_path, seeded_san, monkeypatch):
    # Tests run as root, where permissions do not stop a listing: make scandir fail instead.
    for rel in ("a.jpg", "locked/b.jpg", "z/c.jpg"):
        write_image(tmp_path / "in" / rel, 3, (20, 24))
    real_scandir = os.scandir

    def scandir(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    segmenter = load_segmenter("san", weights=str(seeded_san))
    summary = segment_images(segmenter, InputWalk([str(tmp_path / "in")]), parse_class_list("cat"), tmp_path / "out",
                             formats=("png", "jsonl"))
    assert summary.images_ok == 2 and summary.images_failed == 1
    assert "cannot list directory" in summary.failures[0][1] and "Permission denied" in summary.failures[0][1]
    assert [r["rel"] for r in records(tmp_path / "out").values()] == ["a.jpg", "locked", "z/c.jpg"]


def test_a_writer_error_is_that_images_failure_and_leaves_none_of_its_files(tmp_path, seeded_san, monkeypatch):
    from ovss_cli import segment as segment_module

    for name in ("a", "b", "c"):
        write_image(tmp_path / "in" / f"{name}.jpg", ord(name), (20, 24))
    real = segment_module.render_overlay

    def broken_for_b(image, labels, names, colors):
        if image.shape and broken_for_b.calls == 1:
            broken_for_b.calls += 1
            raise ValueError("overlay renderer broke")
        broken_for_b.calls += 1
        return real(image, labels, names, colors)

    broken_for_b.calls = 0
    monkeypatch.setattr(segment_module, "render_overlay", broken_for_b)
    segmenter = load_segmenter("san", weights=str(seeded_san))
    out = tmp_path / "out"
    summary = segment_images(segmenter, InputWalk([str(tmp_path / "in")]), parse_class_list("cat,sofa"), out)
    assert summary.images_ok == 2 and summary.images_failed == 1
    assert "overlay renderer broke" in summary.failures[0][1]
    # b's label PNG had been written before its overlay failed: it is gone again
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["a.png", "c.png"]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["a.png", "c.png"]
    coco = json.loads((out / "coco.json").read_text())
    assert [img["file_name"] for img in coco["images"]] == ["a.jpg", "c.jpg"]


# --- nothing to do ---------------------------------------------------------------------------


def test_a_folder_without_images_says_what_it_skipped(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.heic", "b.heic", "c.HEIC", "d.svg", "notes.txt", ".hidden.jpg"):
        (folder / name).write_bytes(b"x")
    out = tmp_path / "out"
    # no --weights: nothing may be loaded (or downloaded) before the walk has found an image
    result = CliRunner().invoke(app, ["segment", str(folder), "--classes", "cat", "--out", str(out)])
    assert result.exit_code == 3, result.output
    text = " ".join(result.output.split())
    assert f"no image found in {folder}" in text and "skipped 5 other files (3 .heic, 1 .svg, 1 .txt)" in text
    assert ".jpg" in text  # what is supported
    assert "1 hidden entries (names starting with '.') were not read" in text
    assert not out.exists()


def test_empty_stdin_is_an_error_and_writes_nothing(tmp_path, seeded_san):
    result = CliRunner().invoke(app, ["segment", "-", "--classes", "cat", "--weights", str(seeded_san),
                                      "--out", str(tmp_path / "out")], input="\n\n")
    assert result.exit_code == 3 and "no image found in stdin" in result.output
    assert not (tmp_path / "out").exists()


def test_skipped_files_are_in_the_summary(tmp_path, seeded_san):
    write_image(tmp_path / "in" / "a.jpg", 1, (20, 24))
    (tmp_path / "in" / "b.heic").write_bytes(b"x")
    result = CliRunner().invoke(app, ["segment", str(tmp_path / "in"), "--classes", "cat", "--weights",
                                      str(seeded_san), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "files that are not images: 1 .heic" in result.output


# --- an interrupted run does not look finished ------------------------------------------------


def test_an_interrupted_run_publishes_neither_manifest_nor_coco(tmp_path, seeded_san):
    for i in range(4):
        write_image(tmp_path / "in" / f"{i}.jpg", i, (20, 24))
    segmenter = load_segmenter("san", weights=str(seeded_san))
    real = segmenter.predict_batch
    calls = []

    def interrupted(images, vocabulary, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(images, vocabulary, **kwargs)

    segmenter.predict_batch = interrupted
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        segment_images(segmenter, InputWalk([str(tmp_path / "in")]), parse_class_list("cat"), out)
    assert not (out / "manifest.jsonl").exists() and not (out / "coco.json").exists()
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["0.png", "1.png"]
    assert not [p for p in out.rglob("*.tmp")]  # no temp file left behind
    # the same run again does the rest only, and publishes
    calls.clear()
    segmenter.predict_batch = lambda images, vocabulary, **kw: calls.append(1) or real(images, vocabulary, **kw)
    summary = segment_images(segmenter, InputWalk([str(tmp_path / "in")]), parse_class_list("cat"), out)
    assert summary.images_reused == 2 and summary.images_ok == 2 and len(calls) == 2
    assert [json.loads(line)["rel"] for line in (out / "manifest.jsonl").read_text().splitlines()] == \
        ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]


def test_ctrl_c_exits_130_without_a_traceback(tmp_path, seeded_san, monkeypatch):
    from ovss_cli.models.san.segmenter import SanSegmenter

    write_image(tmp_path / "in" / "a.jpg", 1, (20, 24))

    def interrupt(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(SanSegmenter, "predict_batch", interrupt)
    result = CliRunner().invoke(app, ["segment", str(tmp_path / "in"), "--classes", "cat", "--weights",
                                      str(seeded_san), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 130 and "interrupted" in result.output
    assert not (tmp_path / "out" / "manifest.jsonl").exists()

"""`ovss evaluate` on small synthetic datasets in every on-disk layout, both methods."""
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

from helpers import EXPECTED_COUNTS, build_layout, write_seeded_alpha_clip, write_seeded_sam
from ovss_cli import load_segmenter
from ovss_cli.cli import app
from ovss_cli.datasets import DATASETS
from ovss_cli.io.images import read_image
from ovss_cli.metrics import ConfusionMatrix

SIZE = (24, 32)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_each_layout_with_san_matches_a_direct_computation(tmp_path, seeded_san, name):
    labels = build_layout(tmp_path / "data", name, ["a", "b", "c"], size=SIZE)
    result = invoke("evaluate", "--dataset", name, "--data-root", str(tmp_path / "data"), "--weights", str(seeded_san),
                    "--resize-short", "0", "--out", str(tmp_path / "out"), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["images"] == 3 and report["failed"] == 0 and report["method"] == "san"
    # the same numbers computed directly
    spec = DATASETS[name]
    segmenter = load_segmenter("san", weights=str(seeded_san), resize_short=None)
    from ovss_cli.vocabulary import Vocabulary
    from ovss_cli.datasets import benchmark_class_names

    vocab = Vocabulary.for_benchmark(benchmark_class_names(spec.classes_file))
    cm = ConfusionMatrix(len(vocab), spec.ignore_label)
    for sample_id, label in labels.items():
        image = read_image(tmp_path / "data" / spec.image_dir / f"{sample_id}{spec.image_ext}")
        cm.update(segmenter.predict(image, vocab).labels, label)
    expected = cm.compute()
    assert report["metrics"]["mIoU"] == pytest.approx(expected.miou, nan_ok=True)
    assert report["metrics"]["pACC"] == pytest.approx(expected.pacc)
    saved = np.load(tmp_path / "out" / "confusion.npy")
    assert np.array_equal(saved, cm.matrix)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["images"] == 3


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sam-models")
    clip, alpha = write_seeded_alpha_clip(folder)
    return ["--method", "sam", "--weights", str(alpha), "--clip-weights", str(clip), "--sam-weights",
            str(write_seeded_sam(folder / "sam.pth")), "--points-per-side", "2", "--pred-iou-thresh", "0",
            "--stability-score-thresh", "0", "--fill", "nearest"]


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_each_layout_with_sam(tmp_path, tiny_sam, name):
    build_layout(tmp_path / "data", name, ["x"], size=SIZE)
    result = invoke("evaluate", "--dataset", name, "--data-root", str(tmp_path / "data"), *tiny_sam,
                    "--out", str(tmp_path / "out"), "--save-predictions", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["images"] == 1 and report["method"] == "sam"
    assert 0.0 <= report["metrics"]["pACC"] <= 100.0
    pred = cv2.imread(str(tmp_path / "out" / "predictions" / "x.png"), cv2.IMREAD_UNCHANGED)
    assert pred.shape == SIZE


def test_tables_and_per_class(tmp_path, seeded_san):
    build_layout(tmp_path / "data", "voc20", ["a", "b"], size=SIZE)
    result = invoke("evaluate", "--dataset", "voc20", "--data-root", str(tmp_path / "data"), "--weights",
                    str(seeded_san), "--resize-short", "0", "--per-class", "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    for word in ("mIoU", "fwIoU", "mACC", "pACC", "images/s", "aeroplane", "pottedplant", "metrics.json"):
        assert word in result.output


def test_limit_and_subset(tmp_path, seeded_san):
    build_layout(tmp_path / "data", "pc59", [f"im{i}" for i in range(6)], size=SIZE)
    base = ["evaluate", "--dataset", "pc59", "--data-root", str(tmp_path / "data"), "--weights", str(seeded_san),
            "--resize-short", "0", "--json", "--out", str(tmp_path / "o")]
    assert json.loads(invoke(*base, "--limit", "2").stdout)["images"] == 2
    assert json.loads(invoke(*base, "--subset", "0.5").stdout)["images"] == 3


def test_missing_dataset_names_path_and_preparation(tmp_path, seeded_san):
    result = invoke("evaluate", "--dataset", "pc59", "--data-root", str(tmp_path), "--weights", str(seeded_san))
    assert result.exit_code == 5
    text = " ".join(result.output.split())
    assert str(tmp_path / "pcontext" / "val" / "image") in text and "prepare_pcontext_sem_seg_59cls.py" in text
    assert "Traceback" not in result.output
    result = invoke("evaluate", "--dataset", "pc60", "--weights", str(seeded_san))
    assert result.exit_code == 2 and "pc59" in result.output


def write_generic(root: Path, labels: dict[str, int], classes: list[str]) -> list[str]:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for n, (name, cls) in enumerate(labels.items()):
        rgb = np.random.default_rng(n).integers(0, 256, (*SIZE, 3), dtype=np.uint8)
        cv2.imwrite(str(root / "images" / f"{name}.jpg"), rgb)
        lab = np.full(SIZE, cls, np.uint8)
        lab[0, 0] = 255  # one ignored pixel
        cv2.imwrite(str(root / "labels" / f"{name}.png"), lab)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return ["--images", str(root / "images"), "--labels", str(root / "labels"), "--classes-file",
            str(root / "classes.txt")]


def test_open_vocabulary_semantic_similarity_known_answer(tmp_path, seeded_san):
    args = write_generic(tmp_path / "d", {"one": 0, "two": 1}, ["cat", "dog"])
    per_image = tmp_path / "vocab.json"
    # image one (all "cat") is given only the word "cat"; image two (all "dog") only "horse":
    # every pixel takes the only word, so the score is the mean of cos(cat, cat) and cos(horse, dog).
    per_image.write_text(json.dumps({"one": ["cat"], "two": ["horse"]}))
    result = invoke("evaluate", *args, "--per-image-vocabulary", str(per_image), "--weights", str(seeded_san),
                    "--resize-short", "0", "--json", "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    seg = load_segmenter("san", weights=str(seeded_san))
    emb = seg.embed_names(["cat", "horse", "dog"]).numpy().astype(np.float64)
    cos_horse_dog = float(emb[1] @ emb[2])
    assert report["semantic_similarity"]["mean_similarity"] == pytest.approx((1.0 + cos_horse_dog) / 2, abs=1e-6)
    # rescaled: per class, words range over {cat, horse}: "cat" is the best word for cat (1)
    cos_cat_dog = float(emb[0] @ emb[2])
    rescaled_two = 1.0 if cos_horse_dog >= cos_cat_dog else 0.0
    assert report["semantic_similarity"]["rescaled_similarity"] == pytest.approx((1.0 + rescaled_two) / 2, abs=1e-6)
    words = {row["word"]: row for row in report["word_class_pixels"]}
    n = SIZE[0] * SIZE[1] - 1
    assert words["cat"]["classes"] == [{"class": "cat", "pixels": n}]
    assert words["horse"]["classes"] == [{"class": "dog", "pixels": n}]
    assert "metrics" not in report


def test_vocabulary_file_and_errors(tmp_path, seeded_san):
    args = write_generic(tmp_path / "d", {"one": 0}, ["cat", "dog"])
    vocab = tmp_path / "words.txt"
    vocab.write_text("kitten\npuppy\n")
    result = invoke("evaluate", *args, "--vocabulary-file", str(vocab), "--weights", str(seeded_san),
                    "--resize-short", "0", "--json", "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert -1.0 <= report["semantic_similarity"]["mean_similarity"] <= 1.0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"one": []}))
    result = invoke("evaluate", *args, "--per-image-vocabulary", str(bad), "--weights", str(seeded_san))
    assert result.exit_code == 2 and "non-empty list" in result.output
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"other": ["cat"]}))
    result = invoke("evaluate", *args, "--per-image-vocabulary", str(missing), "--weights", str(seeded_san))
    assert result.exit_code == 2 and "no entry for image 'one'" in result.output


def test_datasets_command_finds_a_layout(tmp_path):
    build_layout(tmp_path, "pc59", ["a"], size=SIZE)
    result = invoke("datasets", "--data-root", str(tmp_path))
    assert result.exit_code == 0
    line = next(ln for ln in result.output.splitlines() if "pc59" in ln)
    assert "yes" in line and " 1 " in line


def peak_rss_mib(args: list[str]) -> float:
    proc = subprocess.Popen([sys.executable, "-m", "ovss_cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read().decode()
    return usage.ru_maxrss / 1024


def test_memory_stays_flat_with_more_images(tmp_path, seeded_san):
    classes = [f"class{i}" for i in range(5)]
    rss = {}
    for count in (20, 200):
        root = tmp_path / f"d{count}"
        (root / "images").mkdir(parents=True)
        (root / "labels").mkdir()
        rng = np.random.default_rng(count)
        for i in range(count):
            cv2.imwrite(str(root / "images" / f"{i:04d}.png"), rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))
            cv2.imwrite(str(root / "labels" / f"{i:04d}.png"), rng.integers(0, 5, (64, 80), dtype=np.uint8))
        (root / "classes.txt").write_text("\n".join(classes))
        rss[count] = peak_rss_mib(["evaluate", "--images", str(root / "images"), "--labels", str(root / "labels"),
                                   "--classes-file", str(root / "classes.txt"), "--weights", str(seeded_san),
                                   "--resize-short", "0", "--save-predictions", "--quiet", "--out", str(root / "out")])
    print("peak RSS MiB", rss)
    assert rss[200] <= rss[20] * 1.05 + 16, rss

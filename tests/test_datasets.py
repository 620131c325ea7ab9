"""Benchmark layouts, label reading, sample selection and errors, on tiny synthetic datasets."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from ovss_cli.datasets import (
    DATASETS,
    benchmark_class_names,
    dataset_root,
    generic_dataset,
    list_datasets,
    open_dataset,
    parse_class_names,
    read_class_names,
    read_label,
    select_indices,
)
from ovss_cli.errors import DatasetError, UsageError
from ovss_cli.vocabulary import Vocabulary

from helpers import EXPECTED_COUNTS, H, W, build_layout, make_label, write_image, write_label  # noqa: F401


# --------------------------------------------------------------------------- class lists


def test_class_list_counts():
    for name, count in EXPECTED_COUNTS.items():
        assert len(benchmark_class_names(DATASETS[name].classes_file)) == count, name
    assert set(DATASETS) == set(EXPECTED_COUNTS)


def test_class_list_exact_spellings():
    ade150 = benchmark_class_names("ade150.txt")
    assert ade150[:9] == ["wall", "building", "sky", "floor", "tree", "ceiling", "road, route", "bed", "window "]
    assert ade150[-1] == "flag"
    assert "toilet, can, commode, crapper, pot, potty, stool, throne" in ade150
    ade847 = benchmark_class_names("ade847.txt")
    assert ade847[:3] == ["wall", "building, edifice", "sky"]
    assert ade847[11] == "person, individual, someone, somebody, mortal, soul"
    assert ade847[-1] == "adding machine, totalizer, totaliser"
    pc59 = benchmark_class_names("pc59.txt")
    assert (pc59[0], pc59[49], pc59[54], pc59[-1]) == ("aeroplane", "diningtable", "tvmonitor", "wood")
    pc459 = benchmark_class_names("pc459.txt")
    assert (pc459[0], pc459[-1]) == ("accordion", "wool")
    assert "horse-drawn carriage" in pc459 and "casette recorder" in pc459
    voc20 = benchmark_class_names("voc20.txt")
    assert (voc20[0], voc20[10], voc20[-1]) == ("aeroplane", "diningtable", "tv")
    assert benchmark_class_names("voc21.txt") == ["background", *voc20]
    coco = benchmark_class_names("cocostuff171.txt")
    assert (coco[0], coco[79], coco[80], coco[-1]) == ("person", "toothbrush", "banner", "wood")
    assert "building-other" in coco


def test_class_lists_make_vocabularies_unchanged():
    for name in EXPECTED_COUNTS:
        names = benchmark_class_names(DATASETS[name].classes_file)
        assert Vocabulary.from_names(names).names == names


def test_class_name_reader_keeps_every_character(tmp_path):
    assert parse_class_names("a \nroad, route\n b\n") == ["a ", "road, route", " b"]
    assert parse_class_names("x\r\ny") == ["x", "y"]
    path = tmp_path / "c.txt"
    path.write_text("window \nsky\n", encoding="utf-8")
    assert read_class_names(path) == ["window ", "sky"]
    path.write_text("a\n\nb\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="empty line"):
        read_class_names(path)


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_open_each_layout(tmp_path, name):
    ids = ["img_b", "img_a", "img_c"]
    labels = build_layout(tmp_path, name, ids)
    dataset = open_dataset(name, tmp_path)
    assert dataset.name == name and len(dataset) == 3
    assert len(dataset.class_names) == EXPECTED_COUNTS[name]
    assert dataset.ignore_label == DATASETS[name].ignore_label
    samples = list(dataset.samples())
    assert [s.id for s in samples] == ["img_a", "img_b", "img_c"]
    for sample in samples:
        assert sample.image_path == tmp_path / DATASETS[name].image_dir / f"{sample.id}.jpg"
        label = dataset.read_label(sample.label_path)
        assert label.dtype == np.int64 and label.shape == (H, W)
        np.testing.assert_array_equal(label, labels[sample.id])  # incl. ignore 255 / 65535


def test_sixteen_bit_tiff_values_are_unchanged(tmp_path):
    path = tmp_path / "l.tif"
    values = np.array([[0, 458, 846], [65535, 300, 1]], dtype=np.uint16)
    assert cv2.imwrite(str(path), values)
    np.testing.assert_array_equal(read_label(path), values.astype(np.int64))
    png16 = tmp_path / "l.png"
    assert cv2.imwrite(str(png16), values)
    np.testing.assert_array_equal(read_label(png16), values.astype(np.int64))


def test_voc21_palette_is_read_as_indices_and_split_file_limits(tmp_path):
    labels = build_layout(tmp_path, "voc21", ["2007_000033", "2007_000042"])
    # a training image/label not in val.txt, and an image without any label
    write_image(tmp_path / "VOC2012/JPEGImages/2007_000032.jpg", 9)
    write_label(tmp_path / "VOC2012/SegmentationClass/2007_000032.png", "voc21", make_label("voc21", 9))
    write_image(tmp_path / "VOC2012/JPEGImages/2008_000001.jpg", 10)
    dataset = open_dataset("voc21", tmp_path)
    assert [s.id for s in dataset.samples()] == ["2007_000033", "2007_000042"]
    label = dataset.read_label(tmp_path / "VOC2012/SegmentationClass/2007_000033.png")
    np.testing.assert_array_equal(label, labels["2007_000033"])
    assert label.max() == 255 and label.min() >= 0
    assert dataset.class_names[0] == "background" and DATASETS["voc21"].background_is_label0


def test_voc21_listed_id_without_label_is_an_error(tmp_path):
    build_layout(tmp_path, "voc21", ["a", "b"])
    (tmp_path / "VOC2012/SegmentationClass/b.png").unlink()
    with pytest.raises(DatasetError, match=r"b is listed in .*val\.txt but its label .*b\.png is missing"):
        open_dataset("voc21", tmp_path)
    (tmp_path / "VOC2012/ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(DatasetError, match="split list not found at"):
        open_dataset("voc21", tmp_path)


def test_benchmark_labels_without_images_are_dropped_and_images_without_labels_kept(tmp_path):
    build_layout(tmp_path, "pc59", ["a", "b"])
    write_image(tmp_path / "pcontext/val/image/c.jpg", 3)  # image without a label: kept, and fails when read
    write_label(tmp_path / "pcontext/val/label/d.png", "pc59", make_label("pc59", 4))
    dataset = open_dataset("pc59", tmp_path)
    assert [s.id for s in dataset.samples()] == ["a", "b", "c"]
    assert not list(dataset.samples())[2].label_path.exists()
    assert dataset.unmatched_labels == 1  # labels without an image are dropped, as detectron2 does


def test_voc20_split_is_its_labels(tmp_path):
    """VOC2012/JPEGImages holds every split's images: an image without a val label is another
    split's, not a failed sample (detectron2 pairs them so); the training split reads the same
    folder with the train labels."""
    build_layout(tmp_path, "voc20", ["a", "b"])
    write_image(tmp_path / "VOC2012/JPEGImages/t.jpg", 3)
    write_label(tmp_path / "VOC2012/annotations_detectron2/train/t.png", "voc20", make_label("voc20", 3))
    assert [s.id for s in open_dataset("voc20", tmp_path).samples()] == ["a", "b"]
    train = open_dataset("voc20", tmp_path, split="train")
    assert [s.id for s in train.samples()] == ["t"] and train.name == "voc20-train"


# --------------------------------------------------------------------------- selection


def test_limit_and_subset(tmp_path):
    ids = [f"im{i:02d}" for i in range(10)]
    build_layout(tmp_path, "pc59", ids)
    dataset = open_dataset("pc59", tmp_path)
    assert [s.id for s in dataset.samples(limit=3)] == ids[:3]
    assert [s.id for s in dataset.samples(limit=50)] == ids
    half = [s.id for s in dataset.samples(subset=0.5)]
    assert len(half) == 5 and half == sorted(half) and len(set(half)) == 5
    assert half == [s.id for s in dataset.samples(subset=0.5)]  # deterministic
    positions = [ids.index(i) for i in half]
    assert all(1 <= b - a <= 3 for a, b in zip(positions, positions[1:]))  # spread evenly
    assert [s.id for s in dataset.samples(subset=0.5, limit=2)] == half[:2]
    assert [s.id for s in dataset.samples(subset=1.0)] == ids
    assert len(list(dataset.samples(subset=0.01))) == 1
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(UsageError, match="subset"):
            list(dataset.samples(subset=bad))
    with pytest.raises(UsageError, match="limit"):
        list(dataset.samples(limit=0))


def test_subset_seeds_cover_the_whole_list():
    seen = set()
    for seed in range(40):
        picks = list(select_indices(1000, subset=0.1, seed=seed))
        assert len(picks) == 100 and picks == sorted(picks)
        assert all(0 <= p < 1000 for p in picks)
        assert max(picks) >= 890 and min(picks) <= 9
        seen.update(picks)
    assert len(seen) > 100  # different seeds shift the picks


# --------------------------------------------------------------------------- errors


def test_missing_folder_names_path_and_preparation(tmp_path):
    with pytest.raises(DatasetError) as info:
        open_dataset("pc59", tmp_path / "datasets")
    message = str(info.value)
    expected = tmp_path / "datasets" / "pcontext" / "val" / "image"
    assert message == (
        f"pc59: images not found at {expected}; prepare it with "
        "python datasets/prepare_pcontext_sem_seg_59cls.py (MendelXu/SAN), or pass --data-root"
    )
    assert "\n" not in message


def test_missing_labels_and_empty_folders(tmp_path):
    (tmp_path / "ADE20K_2021_17_01/images_detectron2/validation").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"ade847: no \.jpg images in .*images_detectron2/validation; prepare it with python datasets/prepare_ade20k_full_sem_seg\.py"):
        open_dataset("ade847", tmp_path)
    write_image(tmp_path / "ADE20K_2021_17_01/images_detectron2/validation/x.jpg", 0)
    with pytest.raises(DatasetError, match=r"ade847: labels not found at .*annotations_detectron2/validation; .*--data-root"):
        open_dataset("ade847", tmp_path)
    write_label(tmp_path / "ADE20K_2021_17_01/annotations_detectron2/validation/y.tif", "ade847", make_label("ade847", 0))
    with pytest.raises(DatasetError, match="no label in .* has an image of the same name"):
        open_dataset("ade847", tmp_path)


def test_unknown_dataset_lists_known_names(tmp_path):
    with pytest.raises(UsageError, match="unknown dataset 'ade200'; known datasets: ade150, ade847, pc59"):
        open_dataset("ade200", tmp_path)


def test_bad_label_files(tmp_path):
    rgb = tmp_path / "rgb.png"
    assert cv2.imwrite(str(rgb), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DatasetError, match="pixel mode RGB"):
        read_label(rgb)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="cannot read label"):
        read_label(junk)
    with pytest.raises(DatasetError, match="file not found"):
        read_label(tmp_path / "absent.png")


# --------------------------------------------------------------------------- root, custom, listing


def test_dataset_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    assert dataset_root(None) == Path("datasets")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "env"))
    assert dataset_root(None) == tmp_path / "env"
    assert dataset_root(str(tmp_path / "arg")) == tmp_path / "arg"


def test_generic_layout(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    write_image(images / "b.jpg", 0)
    write_image(images / "sub" / "a.png", 1)
    label_a = np.array([[0, 1], [2, 255]], np.uint8)
    (labels / "sub").mkdir(parents=True)
    cv2.imwrite(str(labels / "sub" / "a.png"), label_a)
    cv2.imwrite(str(labels / "b.tif"), np.ones((H, W), np.uint8))
    cv2.imwrite(str(labels / "extra.png"), np.ones((2, 2), np.uint8))  # no image: ignored
    dataset = generic_dataset(images, labels, ["cat", "dog", "window "])
    assert [s.id for s in dataset.samples()] == ["b", "sub/a"]
    assert dataset.class_names == ["cat", "dog", "window "] and dataset.ignore_label == 255
    sample = list(dataset.samples())[1]
    np.testing.assert_array_equal(dataset.read_label(sample.label_path), label_a)

    write_image(images / "c.jpg", 2)
    with pytest.raises(DatasetError, match=r"no label for image .*c\.jpg: expected .*labels/c\.png"):
        generic_dataset(images, labels, ["cat", "dog", "window "])
    cv2.imwrite(str(labels / "c.png"), np.ones((H, W), np.uint8))
    cv2.imwrite(str(labels / "c.tif"), np.ones((H, W), np.uint8))
    with pytest.raises(DatasetError, match="same name apart from the extension"):
        generic_dataset(images, labels, ["cat", "dog", "window "])
    with pytest.raises(DatasetError, match="images folder not found"):
        generic_dataset(tmp_path / "nope", labels, ["cat"])
    with pytest.raises(UsageError, match="ignore label 1 is also a class index"):
        generic_dataset(images, labels, ["cat", "dog"], ignore_label=1)


def test_list_datasets(tmp_path):
    build_layout(tmp_path, "ade150", ["a", "b"])
    rows = {row["name"]: row for row in list_datasets(tmp_path)}
    assert list(rows) == list(DATASETS)
    assert rows["ade150"]["found"] is True and rows["ade150"]["images"] == 2
    assert rows["ade150"]["classes"] == 150 and rows["ade150"]["problem"] is None
    assert rows["pc459"]["found"] is False and rows["pc459"]["images"] is None
    assert rows["pc459"]["path"] == str(tmp_path / "pcontext_full/val/image")
    assert "prepare_pcontext_sem_seg_459cls.py" in rows["pc459"]["problem"]
    assert {"name", "title", "classes", "found", "images", "path"} <= set(rows["voc21"])

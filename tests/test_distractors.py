"""Distractor classes and "other", SAM's --min-score, and SAN's test-time augmentation."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from typer.testing import CliRunner

from helpers import random_image
from ovss_cli import OTHER, load_segmenter
from ovss_cli.cli import app
from ovss_cli.distractors import distractor_names
from ovss_cli.errors import UsageError
from ovss_cli.io.images import iter_inputs, read_image
from ovss_cli.models.sam_alphaclip.compose import compose
from ovss_cli.models.sam_alphaclip.segmenter import class_probabilities
from ovss_cli.segment import segment_images
from ovss_cli.vocabulary import Vocabulary, parse_class_lines, parse_class_list

CLASSES = "cat,sofa"


def test_distractor_sets():
    everything, stuff = distractor_names("coco-all"), distractor_names("coco-stuff")
    assert len(everything) == 171 and len(stuff) == 91
    assert everything[0] == "person" and stuff[0] == "banner" and "person" not in stuff
    assert distractor_names("none") == []
    with pytest.raises(UsageError, match="unknown --distractors 'coco'"):
        distractor_names("coco")


def test_distractors_skip_the_users_names(tmp_path):
    vocab = parse_class_lines(["Person: human", "dog"]).with_distractors(["person", "HUMAN", "cat", "dog ", "cat"])
    assert vocab.distractors == ("cat",)
    assert vocab.prompt_names == ["Person", "human", "dog", "cat"]
    assert vocab.name_to_class == [0, 0, 1, 2]
    f = tmp_path / "d.txt"
    f.write_text("# mine\ntable\n\nlamp\n")
    assert distractor_names(str(f)) == ["table", "lamp"]


@pytest.fixture(scope="module")
def image_with_other(reference_dir, tmp_path_factory):
    """A synthetic (noise) image on which the small seeded official SAN gives a region to a
    distractor: vocabulary cat, sofa; distractors window, lamp."""
    folder = tmp_path_factory.mktemp("other")
    fixture = torch.load(reference_dir / "san" / "tiny-seed0.fixture.pth", weights_only=True)
    (folder / "in").mkdir()
    cv2.imwrite(str(folder / "in" / "scene.png"), fixture["image_rgb_uint8"].permute(1, 2, 0).numpy()[:, :, ::-1])
    (folder / "clip.json").write_text(json.dumps(fixture["clip_config"]))
    (folder / "distractors.txt").write_text("window\nlamp\n")
    weights = reference_dir / "san" / "tiny-seed0.weights.pth"
    segmenter = load_segmenter("san", weights=str(weights), clip_config=fixture["clip_config"])
    vocab = parse_class_list(CLASSES).with_distractors(["window", "lamp"])
    pred = segmenter.predict(read_image(folder / "in" / "scene.png"), vocab, with_scores=True)
    assert (pred.labels == OTHER).any() and (pred.labels >= 0).any()  # the scene this test needs
    cli = ["--weights", str(weights), "--clip-config", str(folder / "clip.json")]
    return folder, segmenter, vocab, pred, cli


def test_other_is_exactly_where_a_distractor_wins(image_with_other):
    folder, segmenter, vocab, pred, _ = image_with_other
    flat = Vocabulary.from_names(vocab.prompt_names)  # the distractors as ordinary classes
    plain = segmenter.predict(read_image(folder / "in" / "scene.png"), flat, with_scores=True)
    won_by_distractor = plain.labels >= len(vocab)
    assert np.array_equal(pred.labels == OTHER, won_by_distractor)
    assert np.array_equal(pred.labels[~won_by_distractor], plain.labels[~won_by_distractor])
    assert torch.allclose(pred.scores, plain.scores[: len(vocab)])


def test_other_in_png_coco_and_jsonl(image_with_other, tmp_path):
    folder, _, _, pred, cli = image_with_other
    result = CliRunner().invoke(app, ["segment", str(folder / "in"), "--classes", CLASSES, *cli,
                                      "--distractors", str(folder / "distractors.txt"), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    legend = json.loads((tmp_path / "classes.json").read_text())
    assert legend["other"] == 2 and legend["distractors"] == ["window", "lamp"]
    label = cv2.imread(str(tmp_path / "labels" / "scene.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(label == 2, pred.labels == OTHER)
    assert np.array_equal(label[pred.labels >= 0], pred.labels[pred.labels >= 0])
    coco = COCO(str(tmp_path / "coco.json"))
    anns = coco.loadAnns(coco.getAnnIds())
    assert anns and {a["category_id"] for a in anns} <= {1, 2}  # no annotation for "other"
    covered = np.zeros(label.shape, bool)
    for a in anns:
        covered |= mask_utils.decode(a["segmentation"]).astype(bool)
    assert not covered[label == 2].any() and covered[label < 2].all()
    record = json.loads((tmp_path / "manifest.jsonl").read_text())
    other = [c for c in record["classes"] if c["name"] == "other"]
    assert other and other[0]["fraction"] == pytest.approx((pred.labels == OTHER).mean(), abs=1e-6)
    assert "other" in result.output  # the summary table


def test_distractors_none_reproduces_the_plain_output(image_with_other, tmp_path):
    folder, segmenter, _, _, cli = image_with_other
    result = CliRunner().invoke(app, ["segment", str(folder / "in"), "--classes", CLASSES, *cli,
                                      "--out", str(tmp_path), "--distractors", "none", "--quiet"])
    assert result.exit_code == 0, result.output
    plain = segmenter.predict(read_image(folder / "in" / "scene.png"), CLASSES.split(","))
    label = cv2.imread(str(tmp_path / "labels" / "scene.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(label, plain.labels.astype(np.uint8))
    assert json.loads((tmp_path / "classes.json").read_text())["other"] is None


def test_distractor_embeddings_are_encoded_once_per_run(seeded_san, sample_images, tmp_path):
    segmenter = load_segmenter("san", weights=str(seeded_san))
    vocab = parse_class_list(CLASSES).with_distractors(distractor_names("coco-stuff"))
    before = segmenter.prompts.names_encoded
    summary = segment_images(segmenter, iter_inputs([str(sample_images)]), vocab, tmp_path, formats=("png",))
    assert summary.images_ok == 5
    assert segmenter.prompts.names_encoded - before == len(vocab.prompt_names) == 2 + 91


def test_sam_min_score_and_distractors_in_composition():
    full = np.ones((4, 4), bool)
    left = np.zeros((4, 4), bool)
    left[:, :2] = True
    # columns: class 0, class 1, distractor
    probs = np.array([[0.15, 0.15, 0.70], [0.50, 0.30, 0.20]], np.float32)
    pred = compose([full, left], probs, (4, 4), num_classes=2, min_score=0.0, with_scores=True)
    assert (pred.labels[:, :2] == 0).all() and (pred.labels[:, 2:] == OTHER).all()
    assert [s.class_index for s in pred.segments] == [0]  # no segment for the distractor's mask
    assert torch.allclose(pred.scores[:, 0, 3], torch.tensor([0.15, 0.15]))
    stricter = compose([full, left], probs, (4, 4), num_classes=2, min_score=0.6)
    assert (stricter.labels == OTHER).all() and stricter.segments == []


def test_sam_softmax_includes_each_distractor():
    vocab = parse_class_lines(["cat: kitty", "sofa"]).with_distractors(["table", "lamp"])
    logits = torch.tensor([[1.0, 2.0, 0.5, 3.0, 0.0]])  # cat, kitty, sofa, table, lamp
    probs = class_probabilities(logits, vocab)
    assert torch.allclose(probs, torch.tensor([[2.0, 0.5, 3.0, 0.0]]).softmax(-1))


def test_tta_is_the_mean_of_the_augmented_predictions(seeded_san):
    image = random_image(50, 70, seed=11)
    vocab = ["cat", "sofa", "window"]
    tta = load_segmenter("san", weights=str(seeded_san), tta=True).predict(image, vocab, with_scores=True)
    single = load_segmenter("san", weights=str(seeded_san))
    single.max_size = 4480
    views = []
    for short in (320, 480, 640, 800, 960, 1120):
        single.resize_short = short
        views.append(single.predict(image, vocab, with_scores=True).scores)
        views.append(single.predict(np.ascontiguousarray(image[:, ::-1]), vocab, with_scores=True).scores.flip(-1))
    mean = torch.stack(views).mean(0)
    assert tta.scores.shape == (3, 50, 70)
    assert torch.allclose(tta.scores, mean, atol=1e-5, rtol=1e-4)
    assert np.array_equal(tta.labels, mean.argmax(0).numpy())


def test_tta_is_a_san_option_only():
    with pytest.raises(UsageError, match="option --tta does not apply to --method sam"):
        load_segmenter("sam", tta=True)


def test_distractors_naming_a_users_class_join_it():
    vocab = parse_class_list("cat,sofa,windows,wall,dog,bear,hair").with_distractors(distractor_names("coco-all"))
    assert vocab.merged_distractors == {
        "sofa": ["couch"],  # a known synonym
        "windows": ["window-blind", "window-other"],  # the class as a word (plural folded)
        "wall": ["wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood"],
    }
    assert vocab.dropped_distractors == ("cat", "dog", "bear")  # equal names
    # compounds that only contain the word compete as before
    assert {"hot dog", "teddy bear", "hair drier", "person"} <= set(vocab.distractors)
    assert len(vocab.distractors) == 171 - 1 - 2 - 7 - 3
    # merged names are prompted after the class's own, and count for it
    assert vocab.classes[1].prompt_names == ("sofa", "couch") and vocab.classes[1].names == ("sofa",)
    assert vocab.name_to_class[:3] == [0, 1, 1]


def test_class_names_holding_commas_are_matched_by_each_part():
    vocab = parse_class_lines(["cat", "sofa, couch", "person, people"]).with_distractors(distractor_names("coco-all"))
    assert [c.names for c in vocab.classes][1:] == [("sofa, couch",), ("person, people",)]  # one prompt each
    assert set(vocab.dropped_distractors) == {"cat", "couch", "person"}  # equal to a part
    assert not {"couch", "person"} & set(vocab.distractors)
    # a benchmark's whole names ("sofa, couch, lounge"): ADE-847 against the COCO names
    from ovss_cli.datasets.classes import benchmark_class_names

    ade = Vocabulary.for_benchmark(benchmark_class_names("ade847.txt")).with_distractors(distractor_names("coco-all"))
    competing = set(ade.distractors)
    assert not {"person", "car", "couch", "tv"} & competing
    merged = {name for names in ade.merged_distractors.values() for name in names}
    assert {"person", "car", "couch", "tv"} <= set(ade.dropped_distractors) | merged


def test_a_merged_distractors_wins_count_for_its_class(image_with_other):
    folder, segmenter, _, _, _ = image_with_other
    image = read_image(folder / "in" / "scene.png")
    vocab = parse_class_list("cat,window,wall").with_distractors(["window-other", "wall-brick", "lamp"])
    assert vocab.merged_distractors == {"window": ["window-other"], "wall": ["wall-brick"]}
    assert vocab.distractors == ("lamp",)
    flat = Vocabulary.from_names(["cat", "window", "wall", "window-other", "wall-brick", "lamp"])
    plain = segmenter.predict(image, flat).labels
    assert (plain == 3).any() and (plain == 4).any()  # here the two distractors do win pixels
    expected = np.select([plain == 3, plain == 4, plain == 5], [1, 2, OTHER], plain)
    assert np.array_equal(segmenter.predict(image, vocab).labels, expected)


def test_classes_json_lists_merged_and_dropped_distractors(image_with_other, tmp_path):
    folder, _, _, _, cli = image_with_other
    names = tmp_path / "d.txt"
    names.write_text("window-other\nwall-brick\nlamp\ncat\n")
    result = CliRunner().invoke(app, ["segment", str(folder / "in"), "--classes", "cat,window,wall", *cli,
                                      "--distractors", str(names), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    legend = json.loads((tmp_path / "o" / "classes.json").read_text())
    assert legend["distractors"] == ["lamp"] and legend["distractors_dropped"] == ["cat"]
    assert legend["distractors_merged"] == {"window": ["window-other"], "wall": ["wall-brick"]}
    assert "window-other -> window" in " ".join(result.output.split())  # the summary says so

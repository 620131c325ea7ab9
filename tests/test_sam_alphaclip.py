"""SAM + Alpha-CLIP: model parity, region modes, containment filter, composition, end to end."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from typer.testing import CliRunner

from helpers import TINY_CLIP, random_image, write_seeded_alpha_clip, write_seeded_sam
from ovss_cli import UNLABELLED, load_segmenter
from ovss_cli.cli import app
from ovss_cli.clip.model import CLIP_CONFIGS
from ovss_cli.errors import UsageError, WeightsError
from ovss_cli.models.sam_alphaclip.alpha_clip import (AlphaClip, bmm_attention, class_token_block, load_alpha_clip,
                                                       mha_attention)
from ovss_cli.models.sam_alphaclip.compose import compose, fill_nearest, owner_map
from ovss_cli.models.sam_alphaclip.preprocess import preprocess_alpha, preprocess_pixels, resize_crop_geometry
from ovss_cli.models.sam_alphaclip.proposals import SAM_ARCHS, build_sam, containment_filter, infer_sam_arch, load_sam
from ovss_cli.models.sam_alphaclip.regions import blur_image, region_fn, square_crop_box
from ovss_cli.models.sam_alphaclip.segmenter import MaskClassifier, class_probabilities
from ovss_cli.vocabulary import parse_class_lines

# --- Alpha-CLIP model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def official_tiny(reference_dir):
    ref = reference_dir / "alphaclip"
    model = load_alpha_clip(ref / "tiny-seed0.openai-clip.pt", ref / "tiny-seed0.alpha-visual.pth")
    return model, torch.load(ref / "tiny-seed0.fixture.pth", weights_only=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_alpha_clip_parity_with_official_features(official_tiny):
    model, f = official_tiny
    with torch.no_grad():
        image = model.encode_image(f["preprocessed_image"], f["alpha"])
        text = model.encode_text(f["prompts"])
    assert rel_err(image, f["image_features"]) <= 1e-4
    assert rel_err(text, f["text_features"]) <= 1e-4


@pytest.mark.parametrize("kernel", ["sdpa", "bmm"])
def test_both_attention_kernels_give_the_official_features(official_tiny, kernel):
    model, f = official_tiny
    model.visual.attention = kernel
    try:
        with torch.no_grad():
            image = model.encode_image(f["preprocessed_image"], f["alpha"])
    finally:
        model.visual.attention = "sdpa"
    assert rel_err(image, f["image_features"]) <= 1e-5


def test_class_token_block_equals_the_full_blocks_class_token():
    torch.manual_seed(0)
    block = AlphaClip(TINY_CLIP).visual.transformer.resblocks[-1].eval()
    x = torch.randn(9, 3, 64)  # sequence-first: 9 tokens, batch 3
    with torch.no_grad():
        full = block(x)[0]
        seq_first = class_token_block(block, x, mha_attention, token_dim=0)
        batch_first = class_token_block(block, x.transpose(0, 1), bmm_attention, token_dim=1)
    assert seq_first.shape == (3, 64)
    assert torch.allclose(seq_first, full, atol=1e-5)
    assert torch.allclose(batch_first, full, atol=1e-5)


def test_bf16_uses_the_bmm_kernel_and_stays_close_to_fp32(official_tiny):
    model, f = official_tiny
    templates = ["a photo of a {}."]
    exact = MaskClassifier(copy.deepcopy(model), torch.device("cpu"), "fp32", templates)
    fast = MaskClassifier(copy.deepcopy(model), torch.device("cpu"), "bf16", templates)
    assert (exact.model.visual.attention, fast.model.visual.attention) == ("sdpa", "bmm")
    pixels, alpha = f["preprocessed_image"].expand(4, -1, -1, -1), f["alpha"].expand(4, -1, -1, -1)
    seeded = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(5, f["image_features"].shape[1], generator=seeded), dim=-1)
    a, b = exact.logits(pixels, alpha, text), fast.logits(pixels, alpha, text)
    assert b.dtype == torch.float32
    assert rel_err(b, a) < 0.05 and torch.equal(a.argmax(1), b.argmax(1))


def test_pixel_preprocessing_equals_official(official_tiny):
    _, f = official_tiny
    ours = preprocess_pixels(f["image_rgb_uint8"].numpy(), 224)
    assert torch.allclose(ours, f["preprocessed_image"][0], atol=1e-6)


def test_alpha_follows_the_pixels_crop(official_tiny):
    """On the 300x400 fixture the official alpha is squashed to 224x224; ours is resized and
    centre-cropped like the pixels, so a mask of bright pixels stays on those pixels."""
    image = np.zeros((300, 400, 3), np.uint8)
    mask = np.zeros((300, 400), bool)
    mask[100:200, 300:380] = True  # right side: moves under the centre crop
    image[mask] = 255
    pixels = preprocess_pixels(image, 224)
    alpha = preprocess_alpha(torch.from_numpy(mask)[None], 224)[0, 0]
    bright = pixels.mean(0) > 0
    on = alpha > 0
    assert (bright == on).float().mean() > 0.99
    # geometry: 300x400 -> 224x298, crop left 37
    assert resize_crop_geometry(300, 400, 224) == ((224, 298), (0, 37))


@pytest.mark.parametrize("name,config", [("keys-vit-b16.txt", "ViT-B-16"), ("keys-vit-l14.txt", "ViT-L-14"),
                                         ("keys-vit-l14-336.txt", "ViT-L-14-336")])
def test_visual_keys_match_released_checkpoints(reference_dir, name, config):
    expected = {}
    for line in (reference_dir / "alphaclip" / name).read_text().splitlines():
        key, shape = line.split(" ", 1)
        expected[key] = tuple(json.loads(shape))
    with torch.device("meta"):
        model = AlphaClip(CLIP_CONFIGS[config])
    ours = {k.replace("in_proj_weight", "in_proj.weight").replace("in_proj_bias", "in_proj.bias"): tuple(v.shape)
            for k, v in model.visual.state_dict().items()}
    assert ours == expected


def test_wrong_alpha_checkpoint_is_a_clear_error(tmp_path):
    clip, _ = write_seeded_alpha_clip(tmp_path)
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 32, 32)}, bad)
    with pytest.raises(WeightsError, match=r"bad.pth does not match an Alpha-CLIP visual checkpoint: \d+ missing keys"):
        load_alpha_clip(clip, bad)


# --- SAM loading ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["vit_b", "vit_l", "vit_h"])
def test_sam_architecture_is_inferred_from_state_dict(arch):
    with torch.device("meta"):
        state = build_sam(SAM_ARCHS[arch]).state_dict()
    assert infer_sam_arch(state) == SAM_ARCHS[arch]


def test_sam_checkpoint_loads_strictly(tmp_path):
    path = write_seeded_sam(tmp_path / "sam.pth")
    sam = load_sam(path)
    assert sam.image_encoder.patch_embed.proj.weight.shape[0] == 32
    assert torch.equal(sam.pixel_mean.flatten(), torch.tensor([123.675, 116.28, 103.53]))
    state = torch.load(path, weights_only=True)
    state.pop("mask_decoder.iou_token.weight")
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match="broken.pth does not match a SAM"):
        load_sam(tmp_path / "broken.pth")


# --- region modes -----------------------------------------------------------------------


def box_mask(h=100, w=120, x0=30, y0=50, x1=40, y1=70):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_region_none_is_the_whole_image():
    image, mask = random_image(100, 120), box_mask()
    px, m = region_fn("none", image)(mask)
    assert px is image and m is mask


def test_region_black_zeroes_outside():
    image, mask = random_image(100, 120), box_mask()
    px, _ = region_fn("black", image)(mask)
    assert np.array_equal(px[mask], image[mask]) and not px[~mask].any()


def test_region_blur_blurs_outside_only():
    image = np.zeros((100, 120, 3), np.uint8)
    image[:, 60:] = 200  # a vertical edge outside the mask
    mask = box_mask()
    px, _ = region_fn("blur", image)(mask)
    assert np.array_equal(px[mask], image[mask])
    assert 0 < px[10, 59, 0] < 200 and 0 < px[10, 60, 0] < 200  # the edge outside is smeared
    assert px[10, 5, 0] == 0 and px[10, 110, 0] == 200  # far from the edge nothing changes
    assert np.array_equal(blur_image(image), cv2.GaussianBlur(image, (15, 15), 0))


@pytest.mark.parametrize("mode", ["blur", "black"])
def test_region_accepts_non_bool_and_strided_masks(mode):
    image, mask = random_image(100, 120, seed=5), box_mask()
    expected, _ = region_fn(mode, image)(mask)
    as_255 = mask.astype(np.uint8) * 255
    strided = np.zeros((100, 240), bool)
    strided[:, ::2] = mask
    for other in (as_255, strided[:, ::2]):
        px, _ = region_fn(mode, image)(other)
        assert np.array_equal(px, expected)


def test_region_crop_is_a_padded_square():
    mask = box_mask(x0=30, y0=50, x1=40, y1=70)  # 10 x 20 box, centre (35, 60)
    assert square_crop_box(mask) == (22, 47, 48, 73)  # side 20 + 2 * 3 = 26
    image = random_image(100, 120)
    px, m = region_fn("crop", image)(mask)
    assert px.shape == (26, 26, 3) and np.array_equal(px, image[47:73, 22:48])
    assert m.shape == (26, 26) and m.sum() == mask.sum()
    corner = box_mask(x0=0, y0=0, x1=20, y1=10)  # clipped at the image border
    assert square_crop_box(corner) == (0, 0, 23, 18)


def test_region_ellipse_draws_red_around_the_box():
    image = np.zeros((100, 120, 3), np.uint8)
    mask = box_mask(x0=40, y0=40, x1=80, y1=60)  # centre (60, 50), semi-axes (30, 15)
    px, m = region_fn("ellipse", image)(mask)
    assert m is mask
    assert tuple(px[50, 90]) == (255, 0, 0) and tuple(px[50, 30]) == (255, 0, 0)  # ends of the x axis
    assert tuple(px[35, 60]) == (255, 0, 0) and tuple(px[65, 60]) == (255, 0, 0)  # ends of the y axis
    assert not px[50, 60].any() and not px[5, 5].any()
    assert not image.any()  # the input is not drawn on


def test_unknown_region_mode():
    with pytest.raises(UsageError, match="unknown --region 'glow'"):
        region_fn("glow", random_image(4, 4))


# --- containment filter and composition -------------------------------------------------


def test_containment_filter():
    boxes = [(0, 0, 100, 100), (10, 10, 20, 20), (50, 50, 80, 80), (200, 200, 10, 10), (0, 0, 100, 100)]
    # box 1 lies in box 0; box 2 sticks out of box 0; box 4 duplicates box 0 (the first is kept)
    assert containment_filter(boxes) == [0, 2, 3]
    assert containment_filter([]) == []
    assert containment_filter([(5, 5, 10, 10), (0, 0, 30, 30)]) == [1]


def test_compose_smaller_masks_win_and_uncovered_stay_unlabelled():
    big = np.zeros((6, 8), bool)
    big[:, :6] = True
    small = np.zeros((6, 8), bool)
    small[2:4, 2:4] = True
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)
    pred = compose([small, big], probs, (6, 8), with_scores=True)
    expected = np.full((6, 8), UNLABELLED)
    expected[:, :6] = 2  # the big mask's class
    expected[2:4, 2:4] = 0  # the small mask, painted last, wins
    assert np.array_equal(pred.labels, expected)
    assert torch.allclose(pred.scores[:, 3, 3], torch.tensor([0.7, 0.2, 0.1]))
    assert torch.allclose(pred.scores[:, 0, 0], torch.tensor([0.1, 0.1, 0.8]))
    assert torch.equal(pred.scores[:, 0, 7], torch.zeros(3))
    assert [(s.class_index, round(s.score, 3)) for s in pred.segments] == [(0, 0.7), (2, 0.8)]
    assert pred.confidence[3, 3] == pytest.approx(0.7) and pred.confidence[0, 0] == pytest.approx(0.8)
    assert pred.confidence[0, 7] == 0
    assert compose([small, big], probs, (6, 8)).scores is None  # the dense map only when asked


def test_compose_fill_nearest():
    left = np.zeros((3, 10), bool)
    left[:, :2] = True
    right = np.zeros((3, 10), bool)
    right[:, 8:] = True
    probs = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)
    pred = compose([left, right], probs, (3, 10), fill="nearest")
    assert pred.labels[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    owner = owner_map([left, right], (3, 10))
    assert (fill_nearest(owner) >= 0).all()


def test_compose_without_masks_warns():
    pred = compose([], np.zeros((0, 3), np.float32), (5, 7), with_scores=True)
    assert (pred.labels == UNLABELLED).all() and pred.scores.shape == (3, 5, 7)
    assert pred.warnings and "no mask" in pred.warnings[0]


def test_synonyms_take_their_best_name():
    vocab = parse_class_lines(["cat: kitty", "sofa"])
    logits = torch.tensor([[1.0, 3.0, 2.0]])  # cat, kitty, sofa
    probs = class_probabilities(logits, vocab)
    assert torch.allclose(probs, torch.tensor([[3.0, 2.0]]).softmax(-1))


# --- the segmenter ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sam")
    clip, alpha = write_seeded_alpha_clip(folder)
    sam = write_seeded_sam(folder / "tiny-sam.pth")
    return {"clip": clip, "alpha": alpha, "sam": sam}


FAST = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)


def make(tiny_models, **options):
    return load_segmenter("sam", weights=str(tiny_models["alpha"]), clip_weights=str(tiny_models["clip"]),
                          sam_weights=str(tiny_models["sam"]), device="cpu", **{**FAST, **options})


@pytest.mark.parametrize("region", ["none", "blur", "black", "crop", "ellipse"])
def test_batched_classification_equals_one_mask_at_a_time(tiny_models, region):
    seg = make(tiny_models, region=region, mask_batch_size=3)
    image = random_image(90, 130, seed=3)
    rng = np.random.default_rng(0)
    masks = []
    for _ in range(7):
        m = np.zeros((90, 130), bool)
        y, x = rng.integers(0, 60), rng.integers(0, 100)
        m[y : y + rng.integers(5, 30), x : x + rng.integers(5, 30)] = True
        masks.append(m)
    vocab = parse_class_lines(["cat", "dog", "sofa"])
    batched = seg.classifier.classify(image, masks, vocab)
    single = np.concatenate([seg.classifier.classify(image, [m], vocab) for m in masks])
    assert np.allclose(batched, single, atol=1e-5)
    assert np.allclose(batched.sum(1), 1.0, atol=1e-5)


def test_no_alpha_feeds_all_ones(tiny_models):
    seg = make(tiny_models, no_alpha=True)
    _, alphas = seg.classifier.inputs(random_image(50, 60), [box_mask(50, 60, 5, 5, 20, 20)])
    assert torch.allclose(alphas, torch.full_like(alphas, (1 - 0.5) / 0.26))


def test_no_mask_found_is_a_warning(tiny_models):
    seg = make(tiny_models, pred_iou_thresh=1.5)
    pred = seg.predict(random_image(64, 64), ["cat", "sofa"])
    assert (pred.labels == UNLABELLED).all() and pred.warnings


def test_options_of_another_method_are_rejected():
    with pytest.raises(UsageError, match="option --region does not apply to --method san"):
        load_segmenter("san", region="blur")


def test_cli_end_to_end(tmp_path, tiny_models, sample_images):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "segment", str(sample_images / "cat.png"), str(sample_images / "rocket.jpg"), "--method", "sam",
        "--classes", "cat,rocket,sky", "--weights", str(tiny_models["alpha"]), "--clip-weights",
        str(tiny_models["clip"]), "--sam-weights", str(tiny_models["sam"]), "--points-per-side", "4",
        "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--region", "blur", "--fill", "nearest",
        "--out", str(out), "--device", "cpu", "--distractors", "none", "--min-score", "0",
    ])
    assert result.exit_code == 0, result.output
    coco = COCO(str(out / "coco.json"))
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["ok"] for r in records] == [True, True]
    for img in coco.loadImgs(coco.getImgIds()):
        label = cv2.imread(str(out / "labels" / (Path(img["file_name"]).stem + ".png")), cv2.IMREAD_UNCHANGED)
        assert label.shape == (img["height"], img["width"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        assert anns, "one annotation per kept mask"
        for a in anns:  # each kept mask's own region, class and score
            m = mask_utils.decode(a["segmentation"]).astype(bool)
            assert m.sum() == a["area"] and 0 < a["score"] <= 1
        painted = {a["category_id"] - 1 for a in anns}
        assert set(np.unique(label).tolist()) <= painted | {255}
    assert (out / "overlays" / "cat.png").is_file()


def test_zoo_lists_sam_and_alpha_clip():
    result = CliRunner().invoke(app, ["models"])
    for name in ("sam-vit-b", "sam-vit-l", "sam-vit-h", "alpha-clip-b16-grit1m", "alpha-clip-l14-336-grit20m",
                 "alpha-clip-b16-grit1m-mim", "clip-vit-b16-openai"):
        assert name in result.output

"""The pieces of `ovss train-san` on hand-checkable cases: Hungarian matching (against brute
force), each loss term, point sampling, augmentation, the data order, the optimizer recipe."""
from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from helpers import TINY_CLIP, tiny_san_config
from ovss_cli.train.augment import AugmentConfig, augment, color_jitter_ssd, pad_to
from ovss_cli.train.data import DataOrder, RankPositions, epoch_order
from ovss_cli.train.losses import (CriterionConfig, LossNorms, SanCriterion, Target, build_target, class_weight_total,
                                   classification_loss, dice_loss, points_for_crop, sigmoid_ce_loss)
from ovss_cli.train.matcher import HungarianMatcher, batch_dice_cost, batch_sigmoid_ce_cost, linear_sum_assignment
from ovss_cli.train.optim import OptimConfig, PolySchedule, clip_gradients, param_groups, set_trainable
from ovss_cli.train.points import point_sample, uncertain_points


# ----------------------------------------------------------------------------- matching


def brute_force(cost: np.ndarray) -> float:
    n, m = cost.shape
    if n <= m:
        return min(sum(cost[i, c] for i, c in enumerate(cols)) for cols in itertools.permutations(range(m), n))
    return min(sum(cost[r, j] for j, r in enumerate(rows)) for rows in itertools.permutations(range(n), m))


def test_assignment_of_a_hand_solved_matrix():
    cost = np.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    rows, cols = linear_sum_assignment(cost)
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == [1, 0, 2]  # 1 + 2 + 2 = 5


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (5, 1), (3, 3), (4, 6), (6, 4), (5, 5), (2, 7), (7, 3)])
def test_assignment_is_optimal_against_brute_force(shape):
    rng = np.random.default_rng(sum(shape))
    for trial in range(12):
        cost = rng.normal(size=shape) if trial % 3 else rng.integers(0, 4, size=shape).astype(float)  # ties too
        rows, cols = linear_sum_assignment(cost)
        assert len(rows) == min(shape) and len(set(rows)) == len(rows) and len(set(cols)) == len(cols)
        assert list(rows) == sorted(rows)
        assert cost[rows, cols].sum() == pytest.approx(brute_force(cost), abs=1e-9)


def test_assignment_rejects_nan_and_handles_empty():
    with pytest.raises(ValueError, match="NaN or infinite"):
        linear_sum_assignment(np.array([[1.0, np.nan]]))
    rows, cols = linear_sum_assignment(np.zeros((0, 4)))
    assert rows.size == 0 and cols.size == 0


def test_matching_costs_equal_their_definitions():
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 40) * 3, (torch.rand(3, 40) > 0.5).float()
    ce = torch.stack([torch.stack([F.binary_cross_entropy_with_logits(l, t) for t in targets]) for l in logits])
    assert torch.allclose(batch_sigmoid_ce_cost(logits, targets), ce, atol=1e-5)
    p = logits.sigmoid()
    dice = torch.stack([torch.stack([1 - (2 * (a * t).sum() + 1) / (a.sum() + t.sum() + 1) for t in targets]) for a in p])
    assert torch.allclose(batch_dice_cost(logits, targets), dice, atol=1e-6)


def test_matcher_pairs_each_mask_with_the_query_that_predicts_it():
    h = w = 8
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, :, :4] = True  # class 1 on the left
    masks[1, :, 4:] = True  # class 0 on the right
    labels = torch.tensor([1, 0])
    mask_logits = torch.full((6, h, w), -8.0)
    class_logits = torch.zeros(6, 3)
    mask_logits[4, :, :4] = 8.0
    class_logits[4, 1] = 6.0
    mask_logits[2, :, 4:] = 8.0
    class_logits[2, 0] = 6.0
    rows, cols = HungarianMatcher(num_points=256).match(class_logits, mask_logits, labels, masks,
                                                        torch.Generator().manual_seed(0))
    assert dict(zip(rows.tolist(), cols.tolist())) == {2: 1, 4: 0}


# ----------------------------------------------------------------------------- points


def test_point_sample_reads_bilinearly_in_unit_coordinates():
    maps = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    coords = torch.tensor([[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.5, 0.5]]])  # (x, y)
    assert point_sample(maps, coords).flatten().tolist() == [1.0, 2.0, 3.0, 2.5]


def test_uncertain_points_take_the_most_uncertain_candidates_then_uniform_ones():
    logits = torch.linspace(-10, 10, 64).view(1, 1, 8, 8).repeat(2, 1, 1, 1)
    logits[1] = -logits[1]
    points = uncertain_points(logits, 20, 3.0, 0.75, torch.Generator().manual_seed(5))
    again = torch.Generator().manual_seed(5)
    candidates = torch.rand(2, 60, 2, generator=again)
    scores = -point_sample(logits, candidates).abs()[:, 0]
    best = torch.topk(scores, 15, dim=1).indices
    for i in range(2):
        assert torch.equal(points[i, :15], candidates[i, best[i]])
    assert torch.equal(points[:, 15:], torch.rand(2, 5, 2, generator=again))  # the uniform quarter


def test_points_scale_with_the_crop_area():
    assert points_for_crop(640) == 112 * 112
    assert points_for_crop(320) == 112 * 112 // 4


# ----------------------------------------------------------------------------- losses


def test_class_loss_weights_no_object_by_a_tenth():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])  # 1 image, 2 queries, 1 class + no-object
    target = Target(torch.tensor([0]), torch.ones(1, 2, 2, dtype=torch.bool))
    matches = [(torch.tensor([0]), torch.tensor([0]))]
    empty = torch.tensor([1.0, 0.1])
    loss = classification_loss(logits, matches, [target], empty, class_weight_total([target], 2, 0.1))
    expected = (1.0 * math.log(1 + math.exp(-2)) + 0.1 * math.log(2)) / 1.1
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    official = F.cross_entropy(logits.transpose(1, 2), torch.tensor([[0, 1]]), empty)
    assert loss.item() == pytest.approx(official.item(), rel=1e-6)


def test_sigmoid_bce_and_dice_on_points():
    zeros = torch.zeros(2, 4)
    labels = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert sigmoid_ce_loss(zeros, labels, num_masks=2).item() == pytest.approx(math.log(2))
    assert sigmoid_ce_loss(zeros, labels, num_masks=1).item() == pytest.approx(2 * math.log(2))
    sure = torch.tensor([[50.0, 50.0, 50.0, 50.0]])
    assert dice_loss(sure, torch.ones(1, 4), 1).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(-sure, torch.ones(1, 4), 1).item() == pytest.approx(1 - 1 / 5)
    assert dice_loss(zeros[:1], labels[:1], 1).item() == pytest.approx(1 - (2 * 1.0 + 1) / (2.0 + 2 + 1))


def test_targets_are_per_class_masks_without_ignored_pixels():
    label = torch.tensor([[0, 2, 255], [2, 2, 0]])
    target = build_target(label, 255)
    assert target.labels.tolist() == [0, 2]
    assert target.masks.tolist() == [[[True, False, False], [False, False, True]],
                                     [[False, True, False], [True, True, False]]]
    assert class_weight_total([target, build_target(torch.full((2, 2), 255), 255)], 5, 0.1) == pytest.approx(
        2 + 3 * 0.1 + 5 * 0.1)


def _fake_outputs(seed: int, batch: int, queries: int = 6, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    masks = [torch.randn(batch, queries, 4, 4, generator=g) * 3 for _ in range(2)]
    logits = [torch.randn(batch, queries, classes + 1, generator=g) for _ in range(2)]
    labels = [torch.randint(0, classes, (16, 16), generator=g) for _ in range(batch)]
    labels[1][:4] = 255
    return masks, logits, [build_target(lab, 255) for lab in labels]


def test_criterion_terms_are_weighted_with_deep_supervision_last_block_first():
    masks, logits, targets = _fake_outputs(0, 2)
    criterion = SanCriterion(3, CriterionConfig(num_points=1000))
    norms = LossNorms(sum(t.labels.numel() for t in targets), class_weight_total(targets, 6, 0.1))
    losses = criterion(masks, logits, targets, norms, [torch.Generator().manual_seed(i) for i in range(2)])
    assert list(losses) == ["loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0"]
    matches = [criterion.matcher.match(logits[1][i], masks[1][i], t.labels, t.masks, torch.Generator().manual_seed(i))
               for i, t in enumerate(targets)]
    ce = classification_loss(logits[1], matches, targets, criterion.empty_weight, norms.class_weight_total)
    assert losses["loss_ce"].item() == pytest.approx(2 * ce.item(), rel=1e-6)


def test_split_batches_give_the_whole_batch_loss():
    """What DistributedDataParallel relies on: with the shared denominators, the mean of the
    halves' losses is the whole batch's loss, term by term."""
    masks, logits, targets = _fake_outputs(1, 4)
    criterion = SanCriterion(3, CriterionConfig(num_points=1000))
    count, weight = sum(t.labels.numel() for t in targets), class_weight_total(targets, 6, 0.1)
    gens = lambda idx: [torch.Generator().manual_seed(100 + i) for i in idx]  # noqa: E731
    whole = criterion(masks, logits, targets, LossNorms(count, weight), gens(range(4)))
    halves = LossNorms(count / 2, weight / 2)
    first = criterion([m[:2] for m in masks], [l[:2] for l in logits], targets[:2], halves, gens(range(2)))
    second = criterion([m[2:] for m in masks], [l[2:] for l in logits], targets[2:], halves, gens(range(2, 4)))
    for key, value in whole.items():
        assert value.item() == pytest.approx((first[key].item() + second[key].item()) / 2, rel=1e-5)


# ----------------------------------------------------------------------------- augmentation, data order


def test_short_sides_are_the_official_choices_scaled_by_the_crop():
    assert AugmentConfig(640).short_sides == (320, 384, 448, 512, 576, 640, 704, 768, 832, 896, 960)
    assert AugmentConfig(640).max_size == 2560
    assert AugmentConfig(128).short_sides[0] == 64 and AugmentConfig(128).short_sides[-1] == 192


def test_augmented_views_are_crops_padded_with_128_and_ignore():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    label = rng.integers(0, 3, (40, 50)).astype(np.int64)
    cfg = AugmentConfig(crop_size=64)
    for seed in range(6):
        out_image, out_label = augment(image, label, cfg, 255, np.random.default_rng(seed), random.Random(seed))
        assert out_image.shape == (64, 64, 3) and out_label.shape == (64, 64)
        assert set(np.unique(out_label)) <= {0, 1, 2, 255}
        again = augment(image, label, cfg, 255, np.random.default_rng(seed), random.Random(seed))
        assert np.array_equal(again[0], out_image) and np.array_equal(again[1], out_label)
    padded_image, padded_label = pad_to(image[:10, :20], label[:10, :20], 32, 255)
    assert (padded_image[10:] == 128).all() and (padded_image[:, 20:] == 128).all()
    assert (padded_label[10:] == 255).all() and np.array_equal(padded_label[:10, :20], label[:10, :20])


def test_flip_keeps_pixels_and_labels_together():
    image = np.zeros((32, 32, 3), np.uint8)
    label = np.zeros((32, 32), np.int64)
    image[:, :8] = 200
    label[:, :8] = 1
    cfg = AugmentConfig(crop_size=32, color_aug=False)
    flipped = 0
    for seed in range(12):
        out_image, out_label = augment(image, label, cfg, 255, np.random.default_rng(seed), random.Random(seed))
        inner = out_label[:, 1:-1]  # away from the class boundary, which resizing blends
        away = (inner != 255) & (inner == out_label[:, :-2]) & (inner == out_label[:, 2:])
        assert ((inner == 1) == (out_image[:, 1:-1, 0] > 100))[away].all()
        flipped += bool((out_label[:, -4:] == 1).any())
    assert 0 < flipped < 12


def test_colour_jitter_changes_pixels_only():
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    outs = [color_jitter_ssd(image, random.Random(seed)) for seed in range(8)]
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
    assert any(not np.array_equal(o, image) for o in outs)
    assert np.array_equal(color_jitter_ssd(image, random.Random(3)), outs[3])


def test_ranks_read_their_slots_of_the_same_global_batches():
    one = list(RankPositions(2, 5, 4))
    two = [list(RankPositions(2, 5, 4, rank=r, world=2)) for r in range(2)]
    assert one == list(range(8, 20))
    assert sorted(two[0] + two[1]) == one
    assert two[0][:2] == [8, 9] and two[1][:2] == [10, 11]
    order = DataOrder(seed=3, count=5)
    assert sorted(order.sample_index(p) for p in range(5)) == list(range(5))
    assert [order.sample_index(p) for p in range(5, 10)] == list(epoch_order(3, 1, 5))


# ----------------------------------------------------------------------------- optimizer recipe


@pytest.fixture(scope="module")
def tiny_model():
    from ovss_cli.models.san.checkpoint import build_random_san

    return build_random_san(tiny_san_config(), seed=0)


def test_only_the_side_adapter_clip_positions_and_background_train(tiny_model):
    trained = set_trainable(tiny_model)
    names = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert len(trained) == len(names)
    assert "clip_visual_extractor.positional_embedding" in names and "ov_classifier.bg_embed" in names
    assert {n.split(".")[0] for n in names} == {"side_adapter_network", "clip_visual_extractor", "ov_classifier"}
    assert not any(n.startswith("clip_visual_extractor.") and "positional_embedding" not in n for n in names)
    assert not any(n.startswith(("clip_rec_head.", "ov_classifier.transformer")) for n in names)


def test_weight_decay_exemptions_follow_the_official_rules(tiny_model):
    set_trainable(tiny_model)
    decay = {name: g["weight_decay"] for g in param_groups(tiny_model, OptimConfig()) for name in g["names"]}
    for name in ("side_adapter_network.vit_model.pos_embed", "side_adapter_network.query_embed",
                 "side_adapter_network.query_pos_embed", "clip_visual_extractor.positional_embedding",
                 "side_adapter_network.vit_model.blocks.0.norm1.weight", "side_adapter_network.vit_model.blocks.0.norm2.bias"):
        assert decay[name] == 0.0, name
    for name in ("side_adapter_network.vit_model.blocks.0.attn.qkv.weight", "side_adapter_network.vit_model.blocks.0.attn.qkv.bias",
                 "ov_classifier.bg_embed", "side_adapter_network.fusion_layers.layer_0.input_proj.0.weight",
                 "side_adapter_network.mask_decoder.bias_scaling.weight"):
        assert decay[name] == 1e-4, name
    assert len(decay) == sum(1 for p in tiny_model.parameters() if p.requires_grad)


def test_poly_schedule_and_full_model_clipping():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    optimizer = torch.optim.AdamW([{"params": params, "initial_lr": 1e-3, "lr": 1e-3}])
    schedule = PolySchedule(optimizer, max_iters=100, power=0.9)
    assert schedule.apply(0) == pytest.approx(1e-3)
    assert schedule.apply(50) == pytest.approx(1e-3 * 0.5 ** 0.9)
    assert schedule.apply(99) == pytest.approx(1e-3 * 0.01 ** 0.9)
    params[0].grad, params[1].grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    before = clip_gradients(params, 0.01)
    assert before == pytest.approx(math.sqrt(9 * 3 + 16 * 4))
    assert torch.cat([p.grad for p in params]).norm().item() == pytest.approx(0.01, rel=1e-4)


def test_clip_weights_map_onto_the_san_clip_parts():
    from ovss_cli.clip.model import build_clip
    from ovss_cli.train.start import clip_state_for_san, init_side_adapter

    torch.manual_seed(1)
    clip_state = build_clip(TINY_CLIP).state_dict()
    config = tiny_san_config()
    mapped = clip_state_for_san(clip_state, config)
    k = config.feature_last_layer
    assert torch.equal(mapped["clip_visual_extractor.resblocks.0.attn.in_proj_weight"],
                       clip_state["visual.transformer.resblocks.0.attn.in_proj_weight"])
    assert torch.equal(mapped["clip_rec_head.resblocks.0.mlp.c_fc.weight"],
                       clip_state[f"visual.transformer.resblocks.{k}.mlp.c_fc.weight"])
    assert torch.equal(mapped["clip_rec_head.proj"], clip_state["visual.proj"])
    assert torch.equal(mapped["ov_classifier.token_embedding.weight"], clip_state["token_embedding.weight"])
    from ovss_cli.models.san.checkpoint import build_random_san

    model = build_random_san(config)
    san_keys = {k for k in model.state_dict() if k.startswith(("clip_", "ov_classifier."))}
    assert set(mapped) == san_keys - {"ov_classifier.bg_embed", "ov_classifier.attn_mask"}
    init_side_adapter(model)
    assert all((b.attn.qkv.bias == 0).all() for b in model.side_adapter_network.vit_model.blocks)
    assert model.side_adapter_network.vit_model.blocks[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_benchmarks_list_their_training_split(tmp_path):
    from helpers import make_label, write_image, write_label
    from ovss_cli.datasets import open_dataset
    from ovss_cli.errors import UsageError

    for i in ("a", "b"):
        write_image(tmp_path / "coco" / "train2017" / f"{i}.jpg", 0)
        write_label(tmp_path / "coco" / "stuffthingmaps_detectron2" / "train2017" / f"{i}.png", "cocostuff171",
                    make_label("cocostuff171", 0))
    train = open_dataset("cocostuff171", tmp_path, split="train")
    assert train.name == "cocostuff171-train" and len(train) == 2 and train.num_classes == 171
    assert [s.id for s in train.samples()] == ["a", "b"]
    with pytest.raises(UsageError, match="no 'train' split.*cocostuff171"):
        open_dataset("voc21", tmp_path, split="train")  # read from the VOC release as it is: val only


def test_display_shows_iteration_losses_lr_speed_and_eta(capsys):
    from ovss_cli.train.log import TrainDisplay, loss_text

    losses = {"loss": 10.0, "loss_ce": 1.0, "loss_mask": 2.0, "loss_dice": 3.0, "loss_ce_0": 1.5,
              "loss_mask_0": 1.25, "loss_dice_0": 1.25}
    text = loss_text(losses)
    assert text == "loss 10.000 | ce 1.000 mask 2.000 dice 3.000 | aux 0: ce 1.500 mask 1.250 dice 1.250"
    with TrainDisplay(100, 0, enabled=True, live=False) as display:  # a pipe or log file: plain lines
        display.update(9, losses, 1e-4, 2.0)
    plain = capsys.readouterr().err
    assert plain.startswith("iter 10/100  " + text) and "lr 1.00e-04  2.00 it/s  ETA 0:00:45" in plain
    with TrainDisplay(100, 0, enabled=False) as display:  # --quiet, or not rank 0
        display.update(9, losses, 1e-4, 2.0)
        display.message("hidden")
    assert capsys.readouterr().err == ""
    with TrainDisplay(100, 50, enabled=True, live=True) as display:  # the rich panel
        display.update(59, losses, 1e-4, 2.0)
    panel = " ".join(capsys.readouterr().err.split())  # as one line, however the terminal wrapped it
    assert "60/100 2.00 it/s lr 1.00e-04" in panel and "ETA 0:00:20" in panel and text in panel


def test_loss_plot_marks_the_points_of_a_short_run():
    """A run shorter than --log-every logs a single point, and a line through one point draws
    nothing: the plot must mark it, on an axis of whole iterations done that starts at 0."""
    from ovss_cli.train.log import loss_figure

    losses = {"loss": 10.0, "loss_ce": 1.0, "loss_mask": 2.0, "loss_dice": 3.0, "loss_ce_0": 1.5,
              "loss_mask_0": 1.25, "loss_dice_0": 1.25}
    fig = loss_figure([{"iteration": 9, "lr": 1e-4, **losses},
                       {"iteration": 9, "eval": {"dataset": "val", "miou": 12.5}}])
    loss_axes, eval_axes = fig.axes
    lines = loss_axes.get_lines()
    assert len(lines) == len(losses)
    for line in lines:
        assert line.get_marker() not in (None, "None", "", " ") and list(line.get_xdata()) == [10]
    assert [list(line.get_ydata()) for line in eval_axes.get_lines()] == [[12.5]]
    assert eval_axes.get_xlim()[0] == 0 and all(float(tick).is_integer() for tick in eval_axes.get_xticks())


def test_class_loss_reaches_the_attention_biases_through_frozen_clip(tiny_model):
    """The attention-bias branch (attn_mlp) only acts inside CLIP's recognition blocks, which are
    frozen: its gradient has to flow back through them (QuickGELU must not work in place then)."""
    model = tiny_model
    set_trainable(model)
    model.zero_grad(set_to_none=True)
    classes = F.normalize(torch.randn(3, model.ov_classifier.text_projection.shape[1]), dim=-1)
    images = torch.randn(2, 3, 64, 64)
    _, class_logits = model(images, model.ov_classifier.classifier_weights(classes), all_outputs=True)
    F.cross_entropy(class_logits[-1].flatten(0, 1), torch.zeros(2 * class_logits[-1].shape[1], dtype=torch.long)).backward()
    grad = model.side_adapter_network.mask_decoder.attn_mlp.layers[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.ov_classifier.bg_embed.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.clip_rec_head.parameters())

"""Our automatic mask generator (``--amg ovss``) against segment_anything's (``--amg stock``).

With random weights SAM predicts nearly the same mask for every point, so NMS leaves one or two
and a comparison proves little. :func:`blob_sam` sets the weights of a small SAM (its own
modules: a ViT encoder, the prompt encoder, the two-way transformer decoder) so that each point
predicts three blobs of different sizes and sharpness around itself, with predicted IoUs that
vary from point to point and a little image texture on the edges: many masks survive, and the
thresholds, NMS, the edge-of-crop filter and the small-region clean-up each remove some.
"""
from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from ovss_cli.errors import UsageError
from ovss_cli.models.sam_alphaclip import mask_generator, mask_upscaling
from ovss_cli.models.sam_alphaclip.image_encoding import banded_attention, encode_image
from ovss_cli.models.sam_alphaclip.mask_decoding import PromptDecoder
from ovss_cli.models.sam_alphaclip.proposals import GeneratorOptions, MaskProposer

IMAGE = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
CPU = torch.device("cpu")


def _sam(img_size: int, dim: int) -> Sam:
    grid = img_size // 16
    return Sam(
        image_encoder=ImageEncoderViT(img_size=img_size, patch_size=16, embed_dim=dim, depth=1, num_heads=2,
                                      mlp_ratio=2, norm_layer=partial(nn.LayerNorm, eps=1e-6), qkv_bias=True,
                                      use_rel_pos=True, global_attn_indexes=(0,), window_size=0, out_chans=dim),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid),
                                     input_image_size=(img_size, img_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=dim, iou_head_depth=3,
                                 iou_head_hidden_dim=dim,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=2 * dim, num_heads=8)),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    ).eval().requires_grad_(False)


def _identity_mlp(mlp: nn.Module, offset: float) -> nn.Linear:
    """Make the first two layers of SAM's 3-layer MLP pass ``x + offset`` (positive: the ReLUs
    pass it too); returns the last layer."""
    first, second, last = mlp.layers
    first.weight.copy_(torch.eye(first.in_features))
    first.bias.fill_(offset)
    second.weight.copy_(torch.eye(second.in_features))
    second.bias.zero_()
    return last


@torch.no_grad()
def blob_sam(seed: int = 0, img_size: int = 256, dim: int = 64, freq: float = 0.25, texture: float = 0.003,
             levels: tuple[float, ...] = (1.5, 2.2, 2.7), sharpness: tuple[float, ...] = (10.0, 40.0, 100.0)) -> Sam:
    """A small SAM whose k-th mask for a point p is about ``sharpness[k] * (K(p, q) - levels[k])``
    at each pixel q, with K(p, q) = sum over three directions u of cos(4 pi freq (p - q) . u)
    (coordinates in [0, 1]): a blob around p, smaller and sharper for larger k.

    How: three frequencies of the prompt encoder's random Fourier features carry the kernel
    (the others are zero, i.e. constant), the encoder's positional embedding is the same
    encoding of each image cell (plus a little texture from the pixels), and in the decoder
    every attention output and MLP residual is zero except the first self-attention, which
    gives every token the point's encoding. LayerNorms see these encodings next to a large
    zero-mean constant pattern, so they only scale them; the output upscaling and the
    hypernetwork MLPs pass the three frequencies through (large biases keep GELU/ReLU linear),
    and the mask is their dot product."""
    g = torch.Generator().manual_seed(seed)
    sam = _sam(img_size, dim)
    for p in sam.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    half = dim // 2
    kernel = [0, 1, 2, half, half + 1, half + 2]  # sin and cos of the three kernel frequencies
    others = [c for c in range(dim) if c not in kernel]
    pattern = torch.zeros(dim)
    pattern[others] = torch.tensor([3.0, -3.0] * (len(others) // 2))
    prompts = sam.prompt_encoder
    freqs = torch.zeros(2, half)
    for j in range(3):
        angle = 0.3 + 2 * math.pi * j / 3
        freqs[:, j] = freq * torch.tensor([math.cos(angle), math.sin(angle)])
    prompts.pe_layer.positional_encoding_gaussian_matrix.copy_(freqs)
    for embedding in [*prompts.point_embeddings, prompts.not_a_point_embed, prompts.no_mask_embed]:
        embedding.weight.zero_()
    label = pattern.clone()
    label[half + 3:] -= 1.0  # a positive point: cancel cos(0) = 1 of the unused frequencies
    prompts.point_embeddings[1].weight.copy_(label[None])

    encoder = sam.image_encoder
    dense = prompts.get_dense_pe()[0].permute(1, 2, 0)
    grid = dense.shape[0]
    pos = pattern.expand(grid, grid, dim).clone()
    pos[..., kernel] = dense[..., kernel]
    encoder.pos_embed.copy_(pos[None])
    encoder.patch_embed.proj.weight.mul_(texture / 0.02)
    encoder.patch_embed.proj.weight[others] = 0
    encoder.patch_embed.proj.bias.zero_()
    for block in encoder.blocks:
        for linear in (block.attn.proj, block.mlp.lin2):
            linear.weight.zero_()
            linear.bias.zero_()
    encoder.neck[0].weight.copy_(torch.eye(dim)[:, :, None, None])
    encoder.neck[2].weight.zero_()
    encoder.neck[2].weight[:, :, 1, 1] = torch.eye(dim)
    for norm in (encoder.neck[1], encoder.neck[3]):
        norm.weight.fill_(1)
        norm.bias.zero_()

    decoder = sam.mask_decoder
    decoder.iou_token.weight.zero_()
    decoder.mask_tokens.weight.zero_()
    transformer = decoder.transformer
    for i, layer in enumerate(transformer.layers):
        for norm in (layer.norm1, layer.norm2, layer.norm3, layer.norm4):
            norm.weight.fill_(1)
            norm.bias.zero_()
        for linear in (layer.cross_attn_token_to_image.out_proj, layer.cross_attn_image_to_token.out_proj,
                       layer.mlp.lin2, layer.self_attn.out_proj):
            linear.weight.zero_()
            linear.bias.zero_()
        if i == 0:  # uniform attention over the 7 tokens: each becomes 7 x their mean = the point's
            attn = layer.self_attn
            for linear in (attn.q_proj, attn.k_proj):
                linear.weight.zero_()
                linear.bias.zero_()
            attn.v_proj.weight.copy_(torch.eye(dim))
            attn.v_proj.bias.zero_()
            attn.out_proj.weight.copy_(7 * torch.eye(dim))
    for linear in (transformer.final_attn_token_to_image.out_proj,):
        linear.weight.zero_()
        linear.bias.zero_()
    transformer.norm_final_attn.weight.fill_(1)
    transformer.norm_final_attn.bias.zero_()

    # upscaling: the six kernel channels (+5, so the GELUs are linear) and a constant 5
    conv1, norm, _, conv2, _ = decoder.output_upscaling
    c1 = conv1.out_channels
    conv1.weight.zero_()
    conv1.bias.zero_()
    for out, c in enumerate(kernel):
        conv1.weight[c, out] = 1.0
    big = 30.0  # a zero-mean pattern on the unused channels: the LayerNorm divides by big / sqrt(2)
    conv1.bias[8:] = torch.tensor([big, -big] * ((c1 - 8) // 2))
    norm.weight.zero_()
    norm.bias.zero_()
    norm.weight[:6] = big * math.sqrt((c1 - 8) / c1)
    norm.bias[:7] = 5.0
    conv2.weight.zero_()
    conv2.bias.zero_()
    for c in range(7):
        conv2.weight[c, c] = 1.0
    square = float((pattern ** 2).mean())  # LayerNorm divides each side's encoding by its root
    for k, mlp in enumerate(decoder.output_hypernetworks_mlps):
        last = _identity_mlp(mlp, 10.0)
        a, level = (sharpness[k - 1], levels[k - 1]) if k else (1.0, 1.0)
        weight = a * square
        last.weight.zero_()
        last.bias.zero_()
        for out, c in enumerate(kernel):
            last.weight[out, c] = weight
            last.bias[out] = -10 * weight
            last.weight[6, c] = -weight  # cancels the +5 of the six channels
        last.bias[6] = 10 * weight * len(kernel) - a * level / 5
    last = _identity_mlp(decoder.iou_prediction_head, 10.0)
    last.weight.zero_()
    r = torch.randn(4, len(kernel), generator=g)
    for k in range(4):
        last.weight[k, kernel] = 0.15 * r[k]
        last.bias[k] = 0.86 - 10 * 0.15 * r[k].sum()
    return sam


@pytest.fixture(scope="module")
def sam() -> Sam:
    return blob_sam()


# --- the parts ---------------------------------------------------------------------------------


def test_upscaling_is_postprocess_masks(sam):
    torch.manual_seed(0)
    low = torch.randn(3, 64, 64) * 4
    low[1] = -3  # an empty mask
    for size in [(120, 160), (161, 97), (400, 300)]:
        up = mask_upscaling.upscaling(size, CPU, low=64, encoder=256)
        hl, wl = up.low_res_size
        cut = low[:, :hl, :wl].contiguous()
        padded = torch.nn.functional.pad(cut, (0, 64 - wl, 0, 64 - hl), value=-50.0)  # never read
        input_size = mask_upscaling.ResizeLongestSide.get_preprocess_shape(*size, 256)
        stock = sam.postprocess_masks(padded[:, None], input_size, size)[:, 0]
        assert torch.equal(mask_upscaling.full_logits(cut, up), stock)  # the same resizes
        rows, cols = torch.arange(size[0]).expand(3, -1), torch.arange(size[1]).expand(3, -1)
        window = mask_upscaling.window_logits(cut, up, rows, cols)
        assert torch.allclose(window, stock, rtol=0, atol=1e-5)  # bit-equal on AVX2/AVX-512 CPUs
        assert torch.equal(mask_upscaling.window_logits(cut, up, rows[:, 5:17], cols[:, 30:41]), window[:, 5:17, 30:41])
        # boxes found by scanning bands inward are the boxes of the whole masks
        boxes = mask_upscaling.boxes_above(cut, up, 0.0)
        assert torch.equal(boxes, mask_upscaling._boxes(window > 0)) and boxes[1].tolist() == [0, 0, 0, 0]
        inter, union, box, masks = mask_upscaling.full_size(cut, up, 0.0, 1.0, masks=True)
        assert torch.equal(masks, stock > 0) and torch.equal(box, mask_upscaling._boxes(stock > 0))
        assert torch.equal(inter, (stock > 1).flatten(1).sum(1).int())
        assert torch.equal(union, (stock > -1).flatten(1).sum(1).int())


def test_prompt_decoder_matches_mask_decoder():
    torch.manual_seed(0)
    sam = _sam(256, 256)  # SAM's decoder (256 wide, 8 heads) on a 16 x 16 image embedding
    with torch.no_grad():
        for p in sam.mask_decoder.parameters():  # random weights, not the initial ones
            p.add_(torch.randn_like(p) * 0.05)
        embedding = torch.randn(1, 256, 16, 16)
        points = torch.rand(9, 2, dtype=torch.float64) * 256
        sparse, dense = sam.prompt_encoder(points=(points[:, None], torch.ones(9, 1, dtype=torch.int)), boxes=None,
                                           masks=None)
        stock, stock_iou = sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                            multimask_output=True)
        decoder = PromptDecoder(sam, chunk=4, upscale_chunk=3)
        decoder.set_image(embedding)
        ours, iou = decoder(points, (49, 64))  # the part of the mask a 4:3 image reads
    assert ours.shape == (9, 3, 49, 64)
    scale = float(stock.abs().max())
    assert torch.allclose(ours, stock[..., :49, :], rtol=0, atol=1e-5 * scale)
    assert torch.allclose(iou, stock_iou, rtol=0, atol=1e-5)


def test_banded_attention_is_the_encoders():
    torch.manual_seed(0)
    encoder = _sam(256, 32).image_encoder
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.5)  # zero at initialisation
        x = torch.randn(1, 3, 256, 256)
        block = encoder.blocks[0]
        tokens = block.norm1(encoder.patch_embed(x) + encoder.pos_embed)
        assert torch.allclose(banded_attention(block.attn, tokens, band=48), block.attn(tokens), rtol=0, atol=1e-5)
        assert torch.allclose(encode_image(encoder, x), encoder(x), rtol=0, atol=1e-5)


# --- the same masks as the stock generator ---------------------------------------------------

CASES = {
    "stress": GeneratorOptions(8, 64, 0.0, 0.0, 0, 0),
    "defaults": GeneratorOptions(8),  # pred IoU 0.86, stability 0.92, small regions under 100 px
    "crops": GeneratorOptions(8, crop_n_layers=1),
}


def _stock_logits(sam: Sam, record: dict, options: GeneratorOptions) -> tuple[np.ndarray, float]:
    """A stock generator's mask as the logits it thresholded (full size, image frame, -inf off
    its crop: its point decoded in the same batch, so the same numbers), and the scale of its
    point's prediction (the largest |logit| of its three masks)."""
    x0, y0, w, h = record["crop_box"]
    predictor = SamPredictor(sam)
    predictor.set_image(IMAGE[y0:y0 + h, x0:x0 + w])
    layer = 0 if (w, h) == (IMAGE.shape[1], IMAGE.shape[0]) else 1
    points = mask_generator.build_all_layer_point_grids(options.points_per_side, options.crop_n_layers, 1)[layer]
    points = points * np.array([[w, h]])
    i = int(np.argmin(np.abs(points - (np.array(record["point_coords"][0]) - [x0, y0])).sum(1)))
    start = i - i % options.points_per_batch
    batch = torch.as_tensor(predictor.transform.apply_coords(points[start:start + options.points_per_batch], (h, w)))
    logits, ious, _ = predictor.predict_torch(batch[:, None], torch.ones(len(batch), 1, dtype=torch.int),
                                              multimask_output=True, return_logits=True)
    logits, ious = logits[i - start].numpy(), ious[i - start].numpy()
    k = int(np.argmin(np.abs(ious - record["predicted_iou"])))
    full = np.full(IMAGE.shape[:2], -np.inf, np.float32)
    full[y0:y0 + h, x0:x0 + w] = logits[k]
    return full, float(np.abs(logits).max())


def _assert_same(sam: Sam, record: dict, mine, options: GeneratorOptions) -> None:
    """Our mask is the stock generator's, its scores, box and area too; a pixel (or a stability
    count) may differ only where the stock's logit is a float tie with the threshold (within
    1e-5 of the prediction's scale: our decoder's sums round differently, ~1e-6 of its terms)."""
    assert mine.predicted_iou == pytest.approx(record["predicted_iou"], abs=1e-5)
    differ = record["segmentation"] != mine.mask
    same_stability = mine.stability_score == pytest.approx(record["stability_score"], abs=1e-6, nan_ok=True)
    if not differ.any() and same_stability:
        assert mine.area == record["area"] and mine.bbox == tuple(int(v) for v in record["bbox"])
        return
    logits, scale = _stock_logits(sam, record, options)
    tie = 1e-5 * scale
    assert differ.sum() <= 3 and (np.abs(logits[differ]) <= tie).all(), record["bbox"]
    assert abs(mine.area - record["area"]) <= differ.sum()
    if not same_stability:  # a pixel at +-1 (the stability score's thresholds) is a tie
        assert abs(mine.stability_score - record["stability_score"]) <= 1e-3
        assert (np.abs(np.abs(logits) - 1) <= tie).any(), record["bbox"]


class _Spy:
    """Counts what a stage of our generator kept and removed."""

    def __init__(self, monkeypatch):
        self.nms: list[tuple[int, int]] = []
        self.edge = [0, 0]
        self.changed = 0
        self.ious: list[torch.Tensor] = []
        self.stabilities: list[torch.Tensor] = []
        nms, edge, regions = mask_generator.batched_nms, mask_generator.is_box_near_crop_edge, \
            mask_generator.remove_small_regions
        full_size, decode = mask_generator.full_size, PromptDecoder.__call__

        def spy_nms(boxes, scores, idxs, thresh):
            keep = nms(boxes, scores, idxs, thresh)
            self.nms.append((len(boxes), len(keep)))
            return keep

        def spy_edge(boxes, crop_box, orig_box):
            near = edge(boxes, crop_box, orig_box)
            self.edge[0] += int(near.sum())
            self.edge[1] += len(near)
            return near

        def spy_regions(mask, area, mode):
            mask, changed = regions(mask, area, mode)
            self.changed += changed
            return mask, changed

        def spy_full_size(low, up, threshold, offset, masks=False):
            out = full_size(low, up, threshold, offset, masks=masks)
            if not masks:
                self.stabilities.append(out[0] / out[1])
            return out

        def spy_decode(decoder, points, size):
            out = decode(decoder, points, size)
            self.ious.append(out[1].flatten())
            return out

        monkeypatch.setattr(mask_generator, "batched_nms", spy_nms)
        monkeypatch.setattr(mask_generator, "is_box_near_crop_edge", spy_edge)
        monkeypatch.setattr(mask_generator, "remove_small_regions", spy_regions)
        monkeypatch.setattr(mask_generator, "full_size", spy_full_size)
        monkeypatch.setattr(PromptDecoder, "__call__", spy_decode)


@pytest.mark.parametrize("case", list(CASES))
def test_same_masks_as_the_stock_generator(sam, case, monkeypatch):
    options = CASES[case]
    records = SamAutomaticMaskGenerator(sam, output_mode="binary_mask", **options.__dict__).generate(IMAGE)
    spy = _Spy(monkeypatch)
    ours = MaskProposer(sam, options, CPU, amg="ovss")(IMAGE)
    assert len(ours) == len(records)
    for record, mine in zip(records, ours):  # the same order
        _assert_same(sam, record, mine, options)
    # every stage had work to do: the thresholds, each NMS, the clean-up
    crops = 1 + 4 * options.crop_n_layers
    survivors = len(ours)
    assert sum(len(i) for i in spy.ious) == 3 * 64 * crops  # three masks per point, 8 x 8 points per crop
    assert spy.nms[0][1] < spy.nms[0][0]  # NMS in the (first) crop removed duplicates
    if case == "stress":
        assert survivors >= 50 and not spy.stabilities and spy.changed == 0
    else:
        ious = torch.cat(spy.ious)
        assert 0.1 < float((ious > options.pred_iou_thresh).float().mean()) < 0.9
        stab = torch.cat(spy.stabilities)
        assert 0.1 < float((stab >= options.stability_score_thresh).float().mean()) < 0.9
        assert survivors >= 10 and spy.changed > 0  # small regions cleaned up ...
        assert spy.nms[-1][1] < spy.nms[-1][0]  # ... and the clean-up's NMS removed some
    if case == "crops":
        assert 0 < spy.edge[0] < spy.edge[1]  # masks touching a crop's inner edge dropped
        assert len(spy.nms) == crops + 1 + 1  # in each crop, across crops, after the clean-up
        assert spy.nms[crops][1] < spy.nms[crops][0]


def test_candidates_whose_logits_were_not_kept_are_decoded_again(sam, monkeypatch):
    options = CASES["stress"]
    kept = MaskProposer(sam, options, CPU)(IMAGE)
    monkeypatch.setattr(mask_generator, "_KEEP_BYTES", 20 * 49 * 64 * 4)  # the logits of 20 candidates
    again = []
    decode_again = mask_generator.MaskGenerator._decode_again
    monkeypatch.setattr(mask_generator.MaskGenerator, "_decode_again",
                        lambda self, points, ids, up: again.append(len(ids)) or decode_again(self, points, ids, up))
    lean = MaskProposer(sam, options, CPU)(IMAGE)
    assert sum(again) > 10  # most survivors' logits were dropped and decoded again, ...
    assert len(lean) == len(kept)  # ... giving the same numbers
    for a, b in zip(kept, lean):
        assert np.array_equal(a.mask, b.mask) and (a.bbox, a.area, a.predicted_iou) == (b.bbox, b.area, b.predicted_iou)


def test_stock_generator_is_selectable(sam):
    options = CASES["defaults"]
    stock = MaskProposer(sam, options, CPU, amg="stock")
    assert isinstance(stock.generator, SamAutomaticMaskGenerator)
    assert len(stock(IMAGE)) == len(MaskProposer(sam, options, CPU)(IMAGE))  # ours by default
    with pytest.raises(UsageError, match="--amg"):
        MaskProposer(sam, options, CPU, amg="fast")


# --- the option ----------------------------------------------------------------------------------


def test_amg_flows_through_the_cli_into_the_run_identity(tmp_path, monkeypatch):
    import cv2
    from typer.testing import CliRunner

    from ovss_cli import segment
    from ovss_cli.cli import app
    from ovss_cli.compare.entries import parse_entries
    from ovss_cli.runs import state
    from ovss_cli.segmenter import load_segmenter, segmenter_identity

    assert segmenter_identity("sam")["options"]["amg"] == "ovss"
    assert segmenter_identity("sam", amg="stock")["options"]["amg"] == "stock"
    assert parse_entries(None, ["theirs=sam:amg=stock"], {})[0].options["amg"] == "stock"
    with pytest.raises(UsageError, match="--amg does not apply to --method san"):
        parse_entries(None, ["x=san:amg=stock"], {})
    with pytest.raises(UsageError, match="unknown --amg 'fast'"):
        load_segmenter("sam", amg="fast")  # before any checkpoint is looked for

    image = tmp_path / "a.png"
    cv2.imwrite(str(image), IMAGE)
    out = tmp_path / "out"
    seen = []
    plan = segment.plan_run
    monkeypatch.setattr(segment, "plan_run", lambda walk, folder, identity, **kw: seen.append(identity)
                        or plan(walk, folder, identity, **kw))

    def dry_run(*args: str):
        return CliRunner().invoke(app, ["segment", str(image), "--classes", "cat", "--out", str(out), "--dry-run",
                                        *args])

    assert dry_run("--method", "sam", "--amg", "stock").exit_code == 0
    state.prepare(out, seen[-1], overwrite=False)  # as if a run with the stock generator had started
    resumed = dry_run("--method", "sam")  # ours by default: another run's settings
    assert resumed.exit_code == 2 and "amg: 'stock' before, 'ovss' now" in " ".join(resumed.output.split())
    assert dry_run("--method", "sam", "--amg", "stock").exit_code == 0
    san = dry_run("--amg", "stock")
    assert san.exit_code == 2 and "--amg does not apply to --method san" in san.output

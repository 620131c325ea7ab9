"""Our automatic mask generator: the masks of segment_anything's ``SamAutomaticMaskGenerator``,
computed with less work and bounded memory.

The steps and their order are the stock generator's: a point grid per crop (the whole image,
then ``crop_n_layers`` layers of overlapping crops), three masks per point, the predicted-IoU
filter, the stability score and its filter, the box of each mask, the edge-of-crop filter,
box NMS within a crop, box NMS across crops (smaller crops preferred), then small-region
clean-up with its own NMS. What differs is how:

- the image encoder computes its global attention in bands of queries
  (:mod:`.image_encoding`), and the mask decoder shares the image-side work of all prompts
  (:mod:`.mask_decoding`);
- candidates stay at low resolution; a full-size value is computed only where a result needs
  it (:mod:`.mask_upscaling`): boxes by scanning bands inward from where a mask can reach,
  stability counts over that reach, full masks for the NMS survivors only;
- filters and NMS run on whole batches of candidates on the model's device; no RLE.

In fp32 the masks are the stock generator's (same order, scores, boxes and areas); the
decoder's reassociated sums may move a logit by a rounding error, which changes a pixel only
where a logit is within about 1e-6 of a threshold.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.amg import (
    build_all_layer_point_grids,
    generate_crop_boxes,
    is_box_near_crop_edge,
    remove_small_regions,
    uncrop_boxes_xyxy,
)
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor
from torchvision.ops.boxes import batched_nms, box_area

from .image_encoding import encode_image
from .mask_decoding import PromptDecoder
from .mask_upscaling import Upscaling, boxes_above, full_size, upscaling
from .proposals import GeneratorOptions, Proposal

# Survivors turned into full-size masks at once.
_MASK_GROUP = 8
# Low-resolution logits kept per crop until its NMS, for the best-scored candidates (about 340
# of SAM's 193 x 256 for a 4:3 photo); a survivor whose logits were not kept is decoded again.
_KEEP_BYTES = 64 << 20


@dataclass(frozen=True)
class StockSettings:
    """The stock generator's settings that GeneratorOptions does not expose (its defaults)."""

    box_nms_thresh: float = 0.7
    crop_nms_thresh: float = 0.7
    stability_score_offset: float = 1.0
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1


@dataclass
class _Candidates:
    """Masks of one crop that passed its filters and NMS, in their order."""

    crop: int
    low: Tensor  # N x h x w low-resolution logits
    iou: Tensor  # N predicted IoUs
    stability: Tensor | None  # N, when the stability filter computed it
    boxes: Tensor  # N x 4 XYXY in the image frame


class MaskGenerator:
    """SAM's automatic mask generator: ``generate(image)`` returns the stock generator's
    masks as :class:`Proposal` in its order."""

    def __init__(self, sam: Sam, options: GeneratorOptions, settings: StockSettings = StockSettings()):
        self.sam = sam
        self.options = options
        self.settings = settings
        self.grids = build_all_layer_point_grids(options.points_per_side, options.crop_n_layers,
                                                 settings.crop_n_points_downscale_factor)
        self.resize = ResizeLongestSide(sam.image_encoder.img_size)
        self.low_res = 4 * sam.prompt_encoder.image_embedding_size[0]  # the decoder's mask size
        device = sam.device
        # prompts decoded at once: a whole batch on a GPU; on a CPU at most 16 (about 0.5 GB, about
        # as fast as more), upscaled 4 at a time (the features stay in the cache)
        if device.type == "cpu":
            self.decoder = PromptDecoder(sam, chunk=min(options.points_per_batch, 16), upscale_chunk=4)
        else:
            self.decoder = PromptDecoder(sam, chunk=options.points_per_batch, upscale_chunk=options.points_per_batch)
        self.keep_bytes = _KEEP_BYTES

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[Proposal]:
        """Masks for an H x W x 3 uint8 RGB image."""
        size = image.shape[:2]
        crop_boxes, layers = generate_crop_boxes(size, self.options.crop_n_layers, self.settings.crop_overlap_ratio)
        geometry: list[Upscaling] = []
        found: list[_Candidates] = []
        for i, (box, layer) in enumerate(zip(crop_boxes, layers)):
            x0, y0, x1, y1 = box
            geometry.append(upscaling((y1 - y0, x1 - x0), self.sam.device, low=self.low_res,
                                      encoder=self.sam.image_encoder.img_size))
            found.append(self._crop(image, i, box, layer, geometry[i]))
        order, crop_of = self._across_crops(found, crop_boxes)
        masks, stability = self._full_masks(found, order, crop_of, crop_boxes, geometry, size)
        iou = torch.cat([c.iou for c in found])[order]
        boxes = torch.cat([c.boxes for c in found])[order]
        keep = list(range(len(order)))
        if self.options.min_mask_region_area > 0 and len(order):
            keep, masks, boxes = self._clean(masks, boxes)
        proposals = []
        for i in keep:
            x0, y0, x1, y1 = (int(v) for v in boxes[i].tolist())
            proposals.append(Proposal(mask=masks[i], bbox=(x0, y0, x1 - x0, y1 - y0), area=int(masks[i].sum()),
                                      predicted_iou=float(iou[i]), stability_score=float(stability[i])))
        return proposals

    # --- one crop ---------------------------------------------------------------------------

    def _embed(self, crop: np.ndarray) -> Tensor:
        sam = self.sam
        if sam.image_format != "RGB":
            crop = crop[..., ::-1]
        x = torch.as_tensor(self.resize.apply_image(crop), device=sam.device).permute(2, 0, 1).contiguous()[None]
        return encode_image(sam.image_encoder, sam.preprocess(x))

    def _crop(self, image: np.ndarray, index: int, crop_box: list[int], layer: int, up: Upscaling) -> _Candidates:
        """The stock's ``_process_crop``: every point of the crop's grid, three masks each
        (in that order), filtered, then NMS."""
        o, s, sam = self.options, self.settings, self.sam
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        h, w = crop.shape[:2]
        self.decoder.set_image(self._embed(crop))
        points = torch.as_tensor(self.resize.apply_coords(self.grids[layer] * np.array([[w, h]]), (h, w)),
                                 device=sam.device)
        threshold, offset = sam.mask_threshold, s.stability_score_offset
        store = _LowResStore(self.keep_bytes)
        ids, ious, stabs, boxes = [], [], [], []
        for start in range(0, len(points), o.points_per_batch):
            low, iou = self.decoder(points[start:start + o.points_per_batch], up.low_res_size)
            low, iou = low.flatten(0, 1), iou.flatten(0, 1)
            cand = torch.arange(3 * start, 3 * start + len(iou), device=iou.device)  # point-major, as the stock
            if o.pred_iou_thresh > 0:
                keep = iou > o.pred_iou_thresh
                low, iou, cand = low[keep], iou[keep], cand[keep]
            stab = None
            if o.stability_score_thresh > 0:  # the filter needs every candidate's full-size counts
                inter, union, box, _ = full_size(low, up, threshold, offset)
                stab = inter / union
                keep = stab >= o.stability_score_thresh
                low, iou, cand, stab, box = low[keep], iou[keep], cand[keep], stab[keep], box[keep]
            else:  # only the survivors' scores are needed (computed with their masks)
                box = boxes_above(low, up, threshold)
            keep = ~is_box_near_crop_edge(box, crop_box, [0, 0, image.shape[1], image.shape[0]])
            store.add(cand[keep], low[keep], iou[keep])
            ids.append(cand[keep])
            ious.append(iou[keep])
            boxes.append(box[keep])
            if stab is not None:
                stabs.append(stab[keep])
        iou, box, cand = torch.cat(ious), torch.cat(boxes), torch.cat(ids)
        keep = batched_nms(box.float(), iou, torch.zeros(len(box), device=box.device), s.box_nms_thresh)
        low = store.take(cand[keep], up.low_res_size, lambda missing: self._decode_again(points, missing, up))
        return _Candidates(index, low, iou[keep], torch.cat(stabs)[keep] if stabs else None,
                           uncrop_boxes_xyxy(box[keep], crop_box))

    def _decode_again(self, points: Tensor, candidates: Tensor, up: Upscaling) -> Tensor:
        """Low-resolution logits of ``candidates`` (point * 3 + mask) whose logits were not
        kept: each one's chunk of points decoded again, as the first time (same numbers)."""
        batch, chunk = self.options.points_per_batch, self.decoder.chunk
        point = candidates // 3
        first = point - point % batch  # its batch, then its chunk within the batch
        start = first + (point - first) // chunk * chunk
        out = torch.empty(len(candidates), *up.low_res_size, device=points.device)
        for s in torch.unique(start).tolist():
            mine = torch.nonzero(start == s)[:, 0]
            stop = min(s + chunk, int(first[mine[0]]) + batch, len(points))
            low, _ = self.decoder(points[s:stop], up.low_res_size)
            out[mine] = low[point[mine] - s, candidates[mine] % 3]
        return out

    # --- across crops ------------------------------------------------------------------------

    def _across_crops(self, found: list[_Candidates], crop_boxes: list[list[int]]) -> tuple[Tensor, Tensor]:
        """Indices into the crops' concatenated candidates, in output order, and each one's crop."""
        crop_of = torch.cat([torch.full((len(c.iou),), c.crop, dtype=torch.int64) for c in found])
        if len(crop_boxes) == 1:
            return torch.arange(len(crop_of)), crop_of
        boxes = torch.cat([c.boxes for c in found])
        scores = (1 / box_area(torch.tensor(crop_boxes)[crop_of])).to(boxes.device)  # prefer smaller crops
        keep = batched_nms(boxes.float(), scores, torch.zeros(len(boxes), device=boxes.device),
                           self.settings.crop_nms_thresh)
        return keep.cpu(), crop_of

    def _full_masks(self, found: list[_Candidates], order: Tensor, crop_of: Tensor, crop_boxes: list[list[int]],
                    geometry: list[Upscaling], size: tuple[int, int]) -> tuple[list[np.ndarray], Tensor]:
        """Full-size masks (H x W bool, in ``order``) and stability scores of the survivors."""
        starts = np.cumsum([0] + [len(c.iou) for c in found])
        masks: list[np.ndarray] = [np.zeros(0, bool)] * len(order)
        stability = torch.zeros(len(order))
        threshold, offset = self.sam.mask_threshold, self.settings.stability_score_offset
        for c in found:
            mine = [(pos, int(i) - starts[c.crop]) for pos, i in enumerate(order.tolist()) if crop_of[i] == c.crop]
            x0, y0, x1, y1 = crop_boxes[c.crop]
            for g in range(0, len(mine), _MASK_GROUP):
                group = mine[g:g + _MASK_GROUP]
                local = torch.tensor([i for _, i in group], device=c.low.device)
                inter, union, _, full = full_size(c.low[local], geometry[c.crop], threshold, offset, masks=True)
                stab = (inter / union).cpu() if c.stability is None else c.stability[local].cpu()
                full = full.cpu().numpy()
                for k, (pos, _) in enumerate(group):
                    if full.shape[1:] == tuple(size):
                        masks[pos] = full[k]
                    else:  # a crop's mask, placed in the image
                        masks[pos] = np.zeros(size, bool)
                        masks[pos][y0:y1, x0:x1] = full[k]
                    stability[pos] = stab[k]
        return masks, stability

    # --- small regions ----------------------------------------------------------------------

    def _clean(self, masks: list[np.ndarray], boxes: Tensor) -> tuple[list[int], list[np.ndarray], Tensor]:
        """The stock's ``postprocess_small_regions``: fill small holes, drop small islands, then
        NMS preferring masks that needed neither; returns the kept indices in output order and
        the masks and boxes (changed ones replaced)."""
        area = self.options.min_mask_region_area
        cleaned, scores = [], []
        for mask in masks:
            mask, holes = remove_small_regions(mask, area, mode="holes")
            mask, islands = remove_small_regions(mask, area, mode="islands")
            cleaned.append(mask)
            scores.append(float(not (holes or islands)))
        new_boxes = torch.tensor(np.stack([_mask_box(m) for m in cleaned]), dtype=torch.int64)
        keep = batched_nms(new_boxes.float(), torch.as_tensor(scores), torch.zeros(len(new_boxes)),
                           max(self.settings.box_nms_thresh, self.settings.crop_nms_thresh))
        boxes = boxes.cpu().clone()
        for i in keep.tolist():
            if scores[i] == 0.0:
                boxes[i] = new_boxes[i]
        return keep.tolist(), cleaned, boxes


class _LowResStore:
    """The low-resolution logits of a crop's candidates (ids increasing), at most about
    ``budget`` bytes of them: the best-scored are kept, as NMS prefers those."""

    def __init__(self, budget: int):
        self.budget = budget
        self.ids: list[Tensor] = []
        self.low: list[Tensor] = []
        self.scores: list[Tensor] = []

    def add(self, ids: Tensor, low: Tensor, scores: Tensor) -> None:
        self.ids.append(ids)
        self.low.append(low)
        self.scores.append(scores)
        each = low[0].numel() * low.element_size() if len(low) else 1
        stored = sum(len(x) for x in self.ids)
        if stored * each > self.budget:
            cutoff = torch.cat(self.scores).topk(max(1, self.budget // each)).values[-1]
            for i, score in enumerate(self.scores):
                keep = score >= cutoff
                self.ids[i], self.low[i], self.scores[i] = self.ids[i][keep], self.low[i][keep], score[keep]

    def take(self, wanted: Tensor, size: tuple[int, int], decode_again) -> Tensor:
        """The ``size`` logits of candidates ``wanted``, in that order; ``decode_again(missing
        ids)`` for those not kept. Nothing wanted (every candidate filtered out) gives none."""
        if not len(wanted):
            return torch.empty(0, *size, device=wanted.device)
        ids = torch.cat(self.ids)
        part = torch.cat([torch.full((len(x),), i, dtype=torch.int64, device=ids.device) for i, x in enumerate(self.ids)])
        row = torch.cat([torch.arange(len(x), device=ids.device) for x in self.ids])
        pos = torch.searchsorted(ids, wanted).clamp(max=max(0, len(ids) - 1))
        found = (ids[pos] == wanted) if len(ids) else torch.zeros_like(wanted, dtype=torch.bool)
        missing = torch.nonzero(~found)[:, 0]
        again = decode_again(wanted[missing]) if len(missing) else None
        out = torch.empty(len(wanted), *size, device=wanted.device)
        for i, low in enumerate(self.low):
            mine = torch.nonzero(found & (part[pos] == i))[:, 0]
            if len(mine):
                out[mine] = low[row[pos[mine]]]
        if again is not None:
            out[missing] = again
        return out


def _mask_box(mask: np.ndarray) -> np.ndarray:
    """XYXY box (inclusive) of an H x W bool mask, zeros when empty (``batched_mask_to_box``)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return np.zeros(4, np.int64)
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], np.int64)

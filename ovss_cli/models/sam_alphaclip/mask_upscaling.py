"""SAM's low-resolution mask logits at full size, computed only where a result needs them.

``Sam.postprocess_masks`` resizes the decoder's 256 x 256 logits twice (bilinear,
align_corners=False): to the encoder's 1024 x 1024 input, then, with the padding cut off, to
the image (or crop) size. Every full-size value is a convex combination of a few
low-resolution values, so

- the low-resolution values bound where a full-size value can exceed a threshold (the reach),
  and often show that a line certainly holds one: a mask's box is found from its reach and a
  few bands of full-size values scanned inward, not from the whole mask;
- a window of full-size values can be computed from a window of low-resolution values, with
  the arithmetic of PyTorch's CPU kernel (width first, then height; each pair of samples
  combined as ``a * w0 + b * w1`` with the first product fused): the same bits as the full
  resize on AVX2/AVX-512 CPUs, a rounding apart elsewhere;
- whole masks (the survivors; every candidate when the stability filter needs its counts) are
  upscaled with PyTorch's own resizes, so with the stock's numbers on any device, a few masks
  at a time and without the padding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor
from torch.nn import functional as F

# Values within this share of a mask's largest |logit| of a threshold may round either way.
_ROUNDING = 1e-5
# Values per resize step computed at once when masks are upscaled whole (masks x rows x columns).
_WINDOW_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class Resize1d:
    """One axis of one bilinear resize: output i reads inputs i0[i], i1[i] with weights w0, w1."""

    i0: Tensor
    i1: Tensor
    w0: Tensor
    w1: Tensor


def resize_1d(in_size: int, out_size: int, device: torch.device) -> Resize1d:
    """Source indices and weights of ``F.interpolate(mode='bilinear', align_corners=False)``
    along one axis, computed as PyTorch does (scale in float32, source index in double then
    float32, clamped at 0)."""
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    dst = torch.arange(out_size, dtype=torch.float64)
    src = (scale.double() * (dst + 0.5) - 0.5).float().clamp(min=0)
    i0 = src.long().clamp(max=in_size - 1)
    i1 = i0 + (i0 < in_size - 1).long()
    w1 = (src - i0.float()).clamp(0, 1)
    w0 = 1 - w1
    return Resize1d(i0.to(device), i1.to(device), w0.to(device), w1.to(device))


@dataclass(frozen=True)
class AxisMap:
    """One axis of SAM's two resizes: low resolution -> encoder input (first ``size`` of it)
    -> output. ``lo[i]``/``hi[i]``: the lowest/highest low-resolution index output i reads."""

    first: Resize1d
    second: Resize1d
    lo: Tensor
    hi: Tensor

    @property
    def low_size(self) -> int:
        """Low-resolution indices read at all (0 .. low_size - 1)."""
        return int(self.first.i1.max()) + 1


def axis_map(low: int, encoder: int, kept: int, out: int, device: torch.device) -> AxisMap:
    first = resize_1d(low, encoder, device)
    first = Resize1d(first.i0[:kept], first.i1[:kept], first.w0[:kept], first.w1[:kept])
    second = resize_1d(kept, out, device)
    return AxisMap(first, second, first.i0[second.i0], first.i1[second.i1])


@dataclass(frozen=True)
class Upscaling:
    """How SAM takes its low-resolution masks to an image (or crop) of ``size`` = (h, w)."""

    size: tuple[int, int]
    rows: AxisMap
    cols: AxisMap
    low: int  # the decoder's mask size (256)
    encoder: int  # the encoder's input size (1024)

    @property
    def low_res_size(self) -> tuple[int, int]:
        """The part of the low-resolution mask that reaches the image (the rest is padding)."""
        return self.rows.low_size, self.cols.low_size


def upscaling(size: tuple[int, int], device: torch.device, low: int = 256, encoder: int = 1024) -> Upscaling:
    """The upscaling of ``Sam.postprocess_masks`` for an image of ``size`` = (h, w)."""
    kept_h, kept_w = ResizeLongestSide.get_preprocess_shape(size[0], size[1], encoder)
    return Upscaling(tuple(size), axis_map(low, encoder, kept_h, size[0], device),
                     axis_map(low, encoder, kept_w, size[1], device), low, encoder)


def _span(start: Tensor, last: Tensor, n: int) -> Tensor:
    """B x n indices start, start + 1, ... clamped at ``last`` (per row)."""
    return torch.minimum(start[:, None] + torch.arange(n, device=start.device), last[:, None])


def _gather(x: Tensor, dim: int, index: Tensor) -> Tensor:
    """``x`` (B x R x C) at per-row indices along ``dim`` (index: B x n)."""
    shape = list(x.shape)
    shape[dim] = index.shape[1]
    return x.gather(dim, (index[:, :, None] if dim == 1 else index[:, None, :]).expand(shape))


def _pair(a: Tensor, b: Tensor, w0: Tensor, w1: Tensor) -> Tensor:
    """``a * w0 + b * w1`` as PyTorch's CPU bilinear kernel rounds it (the first product fused)."""
    return torch.addcmul(b * w1, a, w0)


def window_logits(low: Tensor, up: Upscaling, rows: Tensor, cols: Tensor) -> Tensor:
    """Full-size logits of masks ``low`` (B x h x w low resolution) at output rows ``rows``
    (B x ny) and columns ``cols`` (B x nx), each a nondecreasing run of indices per mask."""
    r, c = up.rows, up.cols
    mid_r = _span(r.second.i0[rows[:, 0]], r.second.i1[rows[:, -1]],
                  int((r.second.i1[rows[:, -1]] - r.second.i0[rows[:, 0]]).max()) + 1)
    mid_c = _span(c.second.i0[cols[:, 0]], c.second.i1[cols[:, -1]],
                  int((c.second.i1[cols[:, -1]] - c.second.i0[cols[:, 0]]).max()) + 1)
    low_r = _span(r.first.i0[mid_r[:, 0]], r.first.i1[mid_r[:, -1]],
                  int((r.first.i1[mid_r[:, -1]] - r.first.i0[mid_r[:, 0]]).max()) + 1)
    low_c = _span(c.first.i0[mid_c[:, 0]], c.first.i1[mid_c[:, -1]],
                  int((c.first.i1[mid_c[:, -1]] - c.first.i0[mid_c[:, 0]]).max()) + 1)
    x = _gather(_gather(low, 1, low_r), 2, low_c)
    # first resize, width then height
    i0, i1 = c.first.i0[mid_c] - low_c[:, :1], c.first.i1[mid_c] - low_c[:, :1]
    x = _pair(_gather(x, 2, i0), _gather(x, 2, i1), c.first.w0[mid_c][:, None], c.first.w1[mid_c][:, None])
    i0, i1 = r.first.i0[mid_r] - low_r[:, :1], r.first.i1[mid_r] - low_r[:, :1]
    x = _pair(_gather(x, 1, i0), _gather(x, 1, i1), r.first.w0[mid_r][:, :, None], r.first.w1[mid_r][:, :, None])
    # second resize, width then height
    i0, i1 = c.second.i0[cols] - mid_c[:, :1], c.second.i1[cols] - mid_c[:, :1]
    x = _pair(_gather(x, 2, i0), _gather(x, 2, i1), c.second.w0[cols][:, None], c.second.w1[cols][:, None])
    i0, i1 = r.second.i0[rows] - mid_r[:, :1], r.second.i1[rows] - mid_r[:, :1]
    return _pair(_gather(x, 1, i0), _gather(x, 1, i1), r.second.w0[rows][:, :, None], r.second.w1[rows][:, :, None])


@dataclass
class Reach:
    """Per mask, the output rows and columns [first, last] outside of which no full-size value
    exceeds a threshold; ``empty`` where none can."""

    row_first: Tensor
    row_last: Tensor
    col_first: Tensor
    col_last: Tensor
    empty: Tensor


def _first_last(hit: Tensor) -> tuple[Tensor, Tensor]:
    n = hit.shape[1]
    return hit.int().argmax(1), n - 1 - hit.flip(1).int().argmax(1)


def reach(low: Tensor, up: Upscaling, threshold: float) -> Reach:
    """Where masks ``low`` (B x h x w) may exceed ``threshold`` at full size: a full-size
    value is a convex combination of the low-resolution values it reads, so it exceeds the
    threshold only if one of them does (less a margin for rounding)."""
    margin = _ROUNDING * (1 + low.abs().flatten(1).amax(1))
    above = low > (threshold - margin)[:, None, None]
    rows_hit, cols_hit = above.any(2), above.any(1)
    r0, r1 = _first_last(rows_hit)
    c0, c1 = _first_last(cols_hit)
    # output i reads low-resolution lo[i]..hi[i] (both nondecreasing in i)
    return Reach(torch.searchsorted(up.rows.hi, r0), torch.searchsorted(up.rows.lo, r1, right=True) - 1,
                 torch.searchsorted(up.cols.hi, c0), torch.searchsorted(up.cols.lo, c1, right=True) - 1,
                 ~rows_hit.any(1))


def _band(up: Upscaling) -> tuple[int, int]:
    """Rows and columns scanned at once when looking for a box edge: about two
    low-resolution pixels (the width of the margin between the reach and the mask)."""
    (hl, wl), (h, w) = up.low_res_size, up.size
    return max(8, 2 * -(-h // hl) + 2), max(8, 2 * -(-w // wl) + 2)


def _scan(low: Tensor, up: Upscaling, threshold: float, start: Tensor, last: Tensor, other0: Tensor,
          other1: Tensor, band: int, along_rows: bool, forward: bool) -> Tensor:
    """The first row (``along_rows``) or column from ``start`` towards ``last`` (inclusive,
    forwards or backwards) holding a value above ``threshold`` within the other axis's
    [other0, other1], per mask; -1 where none does."""
    found = torch.full_like(start, -1)
    todo = torch.arange(low.shape[0], device=low.device)
    pos = start.clone()
    width = int((other1 - other0).max()) + 1 if len(todo) else 0
    steps = torch.arange(band, device=low.device)
    while len(todo):
        if forward:
            idx = torch.minimum(pos[todo][:, None] + steps, last[todo][:, None])
        else:  # the band ending at pos, kept nondecreasing
            idx = torch.maximum(pos[todo][:, None] - band + 1 + steps, last[todo][:, None])
        other = _span(other0[todo], other1[todo], width)
        if along_rows:
            hit = (window_logits(low[todo], up, idx, other) > threshold).any(2)
        else:
            hit = (window_logits(low[todo], up, other, idx) > threshold).any(1)
        any_hit = hit.any(1)
        first = hit.int().argmax(1) if forward else band - 1 - hit.flip(1).int().argmax(1)
        found[todo[any_hit]] = idx.gather(1, first[:, None])[any_hit, 0]
        pos[todo] = pos[todo] + band if forward else pos[todo] - band
        more = ~any_hit & ((pos[todo] <= last[todo]) if forward else (pos[todo] >= last[todo]))
        todo = todo[more]
    return found


def _certain(above: Tensor, first: AxisMap, second: AxisMap, line: Tensor, along_rows: bool) -> Tensor:
    """Per mask, whether output row (``along_rows``) or column ``line`` certainly holds a value
    above the threshold: some output on it reads only low-resolution values that are above
    (``above``: B x h x w, already above by the rounding margin)."""
    if not along_rows:
        above = above.transpose(1, 2)
    lo, hi = first.lo[line], first.hi[line]  # the low-resolution lines it reads
    steps = torch.arange(int((hi - lo).max()) + 1, device=above.device)
    rows = torch.minimum(lo[:, None] + steps, hi[:, None])
    line_ok = _gather(above, 1, rows).all(1)  # B x w: every low-resolution line it reads is above
    steps = torch.arange(int((second.hi - second.lo).max()) + 1, device=above.device)
    cols = torch.minimum(second.lo[:, None] + steps, second.hi[:, None])  # out x steps
    return line_ok[:, cols].all(2).any(1)


def boxes_above(low: Tensor, up: Upscaling, threshold: float) -> Tensor:
    """XYXY boxes (B x 4, int64, inclusive, zeros for an empty mask) of the full-size masks
    ``upscaled(low) > threshold``, as ``batched_mask_to_box`` gives them. Each edge is the
    reach's when that line certainly holds a value above; otherwise bands are scanned inward
    from the reach. Nothing is upscaled whole."""
    out = torch.zeros(low.shape[0], 4, dtype=torch.int64, device=low.device)
    where = reach(low, up, threshold)
    live = torch.nonzero(~where.empty)[:, 0]
    if not len(live):
        return out
    low = low[live]
    margin = _ROUNDING * (1 + low.abs().flatten(1).amax(1))
    sure = low > (threshold + margin)[:, None, None]
    rb, cb = _band(up)
    r0, r1, c0, c1 = where.row_first[live], where.row_last[live], where.col_first[live], where.col_last[live]

    def edge(start: Tensor, last: Tensor, other0: Tensor, other1: Tensor, along_rows: bool, forward: bool) -> Tensor:
        first, second = (up.rows, up.cols) if along_rows else (up.cols, up.rows)
        found = torch.where(_certain(sure, first, second, start, along_rows), start, -1)
        todo = torch.nonzero(found < 0)[:, 0]
        if len(todo):
            found[todo] = _scan(low[todo], up, threshold, start[todo], last[todo], other0[todo], other1[todo],
                                rb if along_rows else cb, along_rows, forward)
        return found

    top = edge(r0, r1, c0, c1, True, True)
    hit = top >= 0  # none at all: an empty mask
    live, low, sure, top, r1, c0, c1 = live[hit], low[hit], sure[hit], top[hit], r1[hit], c0[hit], c1[hit]
    bottom = edge(r1, top, c0, c1, True, False)
    left = edge(c0, c1, top, bottom, False, True)
    right = edge(c1, left, top, bottom, False, False)
    out[live] = torch.stack([left, top, right, bottom], 1)
    return out


def full_logits(low: Tensor, up: Upscaling) -> Tensor:
    """Full-size logits (B x h x w) of masks ``low`` (B x h' x w', the part read): exactly
    ``Sam.postprocess_masks`` (the same resizes, so the same numbers on any device), without
    resizing the padding."""
    ratio = up.encoder // up.low
    x = F.interpolate(low[:, None], scale_factor=float(ratio), mode="bilinear", align_corners=False)
    x = x[..., : len(up.rows.first.i0), : len(up.cols.first.i0)]
    return F.interpolate(x, up.size, mode="bilinear", align_corners=False)[:, 0]


def full_size(low: Tensor, up: Upscaling, threshold: float, offset: float, *, masks: bool = False
              ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Per mask of ``low``: the pixels above ``threshold + offset`` and above ``threshold -
    offset`` (int32: the stability score's intersection and union, as
    ``calculate_stability_score`` counts them), the XYXY box of the pixels above ``threshold``
    (as ``batched_mask_to_box``) and, with ``masks``, those pixels (B x h x w bool). Masks are
    upscaled a few at a time (at most ``_WINDOW_ELEMENTS`` values)."""
    h, w = up.size
    (hl, wl), ratio = up.low_res_size, up.encoder // up.low
    step = max(1, _WINDOW_ELEMENTS // max(h * w, ratio * hl * ratio * wl))
    inter, union, boxes, out = [], [], [], []
    for start in range(0, low.shape[0], step):
        values = full_logits(low[start:start + step], up)
        inter.append((values > threshold + offset).flatten(1).sum(1, dtype=torch.int32))
        union.append((values > threshold - offset).flatten(1).sum(1, dtype=torch.int32))
        above = values > threshold
        boxes.append(_boxes(above))
        if masks:
            out.append(above)
    empty = torch.zeros(0, dtype=torch.int32, device=low.device)
    return (torch.cat(inter) if inter else empty, torch.cat(union) if union else empty,
            torch.cat(boxes) if boxes else torch.zeros(0, 4, dtype=torch.int64, device=low.device),
            (torch.cat(out) if out else torch.zeros(0, h, w, dtype=torch.bool, device=low.device)) if masks else None)


def _boxes(masks: Tensor) -> Tensor:
    """XYXY boxes (inclusive, zeros for an empty mask) of B x h x w bool masks."""
    rows, cols = masks.any(2), masks.any(1)
    r0, r1 = _first_last(rows)
    c0, c1 = _first_last(cols)
    box = torch.stack([c0, r0, c1, r1], 1)
    box[~rows.any(1)] = 0
    return box

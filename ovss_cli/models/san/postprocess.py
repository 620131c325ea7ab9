"""SAN's per-pixel output at the image's own size, without the C x H x W memory.

The official inference computes ``sem_seg = sum_q softmax(class_q)[:-1] * sigmoid(mask_q)``
with every query's mask logits upsampled bilinearly to the padded input, cropped to the
(resized) image, and resized bilinearly to the output size; with test-time augmentation the
views' ``sem_seg`` are averaged. Here the upsampling is written as two small matrices per view
(rows x mask rows, columns x mask columns), so the same values can be produced for any band of
output rows: labels (and the optional score map) are built band by band, and memory is bounded
by :data:`BAND_BUDGET` whatever the image size or the number of names (ADE-847 with the 171
distractors included). Everything stays on the model's device until the final copy to the host.

Speed (it runs once per image, after the network): the columns are resampled once per view at
the mask's height (Q x h x W); each band of output rows then needs only the few mask rows its
bilinear weights touch (a handful instead of h), and on a CPU the bands are small enough for
their Q x rows x W sigmoids to stay in the cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ...segmenter import OTHER
from ...vocabulary import Vocabulary

# Values held per band (fp32): query masks, per-name scores and per-class scores of one view.
BAND_BUDGET = 1 << 25
# On a CPU, bands hold at most this many query-mask values (8 MB), so that they stay in the cache.
CPU_BAND_VALUES = 1 << 21


def bilinear_matrix(in_size: int, out_size: int, device: torch.device | str = "cpu") -> Tensor:
    """out_size x in_size matrix of 1-D bilinear resampling, ``align_corners=False``, with the
    source coordinates PyTorch's ``interpolate`` computes (fp32, clamped at 0, edge repeated)."""
    scale = torch.tensor(in_size, dtype=torch.float32, device=device) / out_size
    src = ((torch.arange(out_size, dtype=torch.float32, device=device) + 0.5) * scale - 0.5).clamp_min(0)
    low = src.floor().long().clamp_max(in_size - 1)
    high = (low + 1).clamp_max(in_size - 1)
    frac = src - low
    rows = torch.arange(out_size, device=device)
    weights = torch.zeros(out_size, in_size, device=device)
    weights.index_put_((rows, low), 1 - frac, accumulate=True)
    return weights.index_put_((rows, high), frac, accumulate=True)


def upsampling_matrix(mask_size: int, padded: int, image: int, out: int, device: torch.device) -> Tensor:
    """out x mask_size: mask logits -> padded input (bilinear) -> first ``image`` entries ->
    ``out`` entries (bilinear; skipped when ``out == image``, where it is the identity)."""
    to_padded = bilinear_matrix(mask_size, padded, device)[:image]
    if out == image:
        return to_padded
    return bilinear_matrix(image, out, device) @ to_padded


@dataclass
class ViewLogits:
    """One view's network output, ready to be resampled to the output size."""

    mask_logits: Tensor  # Q x h x w (fp32, on the device)
    name_probs: Tensor  # Q x N: softmax over the names and background, background dropped
    rows: Tensor  # H x h
    cols: Tensor  # W x w (reversed for a horizontally flipped view)

    def __post_init__(self) -> None:
        # the mask logits resampled along the columns, mask row-major: h x (Q * W)
        q, h, _ = self.mask_logits.shape
        self._row_major = torch.matmul(self.mask_logits.transpose(0, 1), self.cols.T).reshape(h, -1)
        self._probs_t = self.name_probs.T.contiguous()  # N x Q
        # the first and last mask row each output row's bilinear weights touch
        touched = (self.rows != 0).to(torch.int8)
        first = touched.argmax(dim=1)
        last = h - 1 - touched.flip(1).argmax(dim=1)
        self._touched = torch.stack([first, last]).tolist()

    @classmethod
    def build(cls, mask_logits: Tensor, class_logits: Tensor, input_size: tuple[int, int],
              padded: tuple[int, int], out_size: tuple[int, int], flip: bool) -> "ViewLogits":
        """``mask_logits`` Q x h x w and ``class_logits`` Q x (N+1) for a view of
        ``input_size`` padded to ``padded``, whose scores are wanted at ``out_size``."""
        m = mask_logits.float()
        dev = m.device
        rows = upsampling_matrix(m.shape[-2], padded[0], input_size[0], out_size[0], dev)
        cols = upsampling_matrix(m.shape[-1], padded[1], input_size[1], out_size[1], dev)
        probs = class_logits.float().softmax(dim=-1)[:, :-1]
        return cls(m, probs, rows, cols.flip(0) if flip else cols)

    def name_scores(self, start: int, stop: int) -> Tensor:
        """(stop - start) x N x W: ``sum_q p_qn sigmoid(mask_q)`` for output rows [start, stop).

        Only the mask rows that these output rows' weights touch enter the product: the others
        would add exact zeros."""
        low = min(self._touched[0][start:stop])
        high = max(self._touched[1][start:stop]) + 1
        q = self.mask_logits.shape[0]
        masks = (self.rows[start:stop, low:high] @ self._row_major[low:high]).sigmoid_()  # b x (Q * W)
        return torch.matmul(self._probs_t, masks.view(stop - start, q, -1))


@dataclass
class SanOutput:
    """Labels (H x W int32, :data:`OTHER` where a distractor wins), confidence (H x W, the
    winning class's share of the classes' summed score), and the optional C x H x W scores;
    all on the host."""

    labels: Tensor
    confidence: Tensor
    scores: Tensor | None


def combine_views(views: Sequence[ViewLogits], vocabulary: Vocabulary, out_size: tuple[int, int], *,
                  with_scores: bool = False, budget: int = BAND_BUDGET) -> SanOutput:
    """The mean of the views' ``sem_seg`` (each name reduced to its class first), reduced band
    by band to labels and confidence; the class channels are kept only ``with_scores``."""
    height, width = out_size
    num_classes = len(vocabulary)
    dev = views[0].mask_logits.device
    queries = max(v.mask_logits.shape[0] for v in views)
    per_row = width * (queries + len(vocabulary.prompt_names) + vocabulary.num_competitors)
    band = max(1, budget // per_row)
    if dev.type == "cpu":
        band = max(1, min(band, CPU_BAND_VALUES // (width * queries)))
    labels = torch.empty(height, width, dtype=torch.int32, device=dev)
    confidence = torch.empty(height, width, dtype=torch.float32, device=dev)
    scores = torch.empty(num_classes, height, width) if with_scores else None  # on the host
    for start in range(0, height, band):
        stop = min(height, start + band)
        total = None
        for view in views:
            part = vocabulary.best_name_per_class(view.name_scores(start, stop), dim=1)
            total = part if total is None else total.add_(part)
        if len(views) > 1:
            total.div_(len(views))
        # max(dim) gives the first maximal index, as argmax does, and is much faster on a CPU
        best, winner = total.max(dim=1)
        classes = total[:, :num_classes]
        top = best if classes.shape[1] == total.shape[1] else classes.max(dim=1).values
        confidence[start:stop] = top / classes.sum(dim=1).clamp_min(1e-12)
        labels[start:stop] = torch.where(winner < num_classes, winner, OTHER).to(torch.int32)
        if scores is not None:
            scores[:, start:stop] = classes.transpose(0, 1).cpu()
    return SanOutput(labels.cpu(), confidence.cpu(), scores)

"""SAN's output at the image's own size, band by band: equal to the official formula (dense,
with F.interpolate) however large the vocabulary, in bounded memory."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from helpers import random_image, tiny_san_config
from ovss_cli.datasets import benchmark_class_names
from ovss_cli.models.san import postprocess
from ovss_cli.models.san.checkpoint import build_random_san
from ovss_cli.models.san.postprocess import bilinear_matrix, upsampling_matrix
from ovss_cli.models.san.segmenter import SanSegmenter
from ovss_cli.vocabulary import Vocabulary, parse_class_list

OLD_SCORE_BUDGET = 1 << 28  # values: above it the old code built scores at 640 px and resized them


@pytest.mark.parametrize("size_in,size_out", [(40, 640), (54, 864), (7, 7), (640, 512), (853, 683), (5, 3)])
def test_bilinear_matrix_is_torch_interpolate(size_in, size_out):
    x = torch.randn(3, size_in, 4)
    expected = F.interpolate(x.permute(0, 2, 1)[:, :, :, None], size=(size_out, 1), mode="bilinear",
                             align_corners=False)[:, :, :, 0].permute(0, 2, 1)
    got = bilinear_matrix(size_in, size_out) @ x
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-6)


def test_upsampling_matrix_is_interpolate_crop_interpolate():
    m = torch.randn(5, 40, 54)
    padded, image, out = (640, 864), (640, 853), (512, 683)
    x = F.interpolate(m[None], size=padded, mode="bilinear", align_corners=False)[:, :, : image[0], : image[1]]
    expected = F.interpolate(x, size=out, mode="bilinear", align_corners=False)[0]
    rows = upsampling_matrix(40, padded[0], image[0], out[0], torch.device("cpu"))
    cols = upsampling_matrix(54, padded[1], image[1], out[1], torch.device("cpu"))
    assert torch.allclose(rows @ m @ cols.T, expected, atol=1e-5, rtol=1e-5)


def sharp_seeded_san(seed: int = 2) -> SanSegmenter:
    """The small seeded SAN with its mask logits scaled to span about +-10, so that every
    sigmoid matters (random weights give logits near 0.2: flat masks) and none is a step; one
    prompt template keeps encoding 847 names cheap."""
    model = build_random_san(tiny_san_config(), seed=seed)
    last = model.side_adapter_network.mask_decoder.pix_mlp.layers[-1]
    with torch.no_grad():
        last.weight.mul_(50)
        last.bias.mul_(50)
    return SanSegmenter(model, model_name="sharp-tiny", device=torch.device("cpu"), templates="photo")


def official_sem_seg(segmenter: SanSegmenter, image: np.ndarray, vocab: Vocabulary, chunk: int = 128):
    """The official formula, written out: masks upsampled with F.interpolate to the padded input,
    cropped, resized to the image, then sum_q softmax(class)[:-1] * sigmoid(mask); yields
    (first class, C_chunk x H x W) pieces so the test holds one piece at a time."""
    view = segmenter._views(0, image)[0]
    padded = segmenter._padded_size(view.tensor)
    h, w = view.tensor.shape[-2:]
    batch = torch.zeros(1, 3, *padded)
    batch[0, :, :h, :w] = view.tensor
    with torch.no_grad():
        mask_logits, class_logits = segmenter.model(batch, segmenter.classifier(vocab))
    masks = F.interpolate(mask_logits[-1], size=padded, mode="bilinear", align_corners=False)[:, :, :h, :w]
    masks = F.interpolate(masks, size=image.shape[:2], mode="bilinear", align_corners=False)[0].sigmoid()
    probs = class_logits[-1][0].softmax(-1)[:, :-1]
    for start in range(0, probs.shape[1], chunk):
        yield start, torch.einsum("qc,qhw->chw", probs[:, start : start + chunk], masks)


def test_ade847_sized_case_equals_the_official_formula_at_the_images_size():
    """A landscape ADE-847 image (512 x 683, inferred at 640 x 854): 847 x 512 x 683 values is
    above the old budget, where scores were built at the inference size and resized."""
    segmenter = sharp_seeded_san()
    vocab = Vocabulary.for_benchmark(benchmark_class_names("ade847.txt"))
    image = random_image(512, 683, seed=7)
    assert len(vocab.prompt_names) * 512 * 683 > OLD_SCORE_BUDGET
    pred = segmenter.predict(image, vocab, with_scores=True)
    assert pred.scores.shape == (847, 512, 683)
    best = torch.full((512, 683), -1.0)
    second = torch.full((512, 683), -1.0)
    winner = torch.zeros(512, 683, dtype=torch.long)
    for start, ref in official_sem_seg(segmenter, image, vocab):
        ours = pred.scores[start : start + ref.shape[0]]
        assert torch.allclose(ours, ref, atol=1e-6, rtol=1e-5)
        top = ref.topk(2, dim=0)
        replace = top.values[0] > best
        second = torch.where(replace, torch.maximum(best, top.values[1]), torch.maximum(second, top.values[0]))
        winner = torch.where(replace, top.indices[0] + start, winner)
        best = torch.maximum(best, top.values[0])
    decided = (best - second > 1e-5 * best).numpy()
    assert decided.mean() > 0.99
    assert np.array_equal(pred.labels[decided], winner.numpy()[decided])
    # the labels-only path gives the same labels
    assert np.array_equal(segmenter.predict(image, vocab).labels, pred.labels)


def test_bands_do_not_change_the_result(monkeypatch):
    segmenter = sharp_seeded_san()
    vocab = parse_class_list("cat,sofa,window").with_distractors(["lamp", "floor"])
    image = random_image(70, 90, seed=8)
    whole = segmenter.predict(image, vocab, with_scores=True)
    monkeypatch.setattr(postprocess, "BAND_BUDGET", 1)  # one row per band
    banded = segmenter.predict(image, vocab, with_scores=True)
    assert np.array_equal(whole.labels, banded.labels)
    assert torch.equal(whole.scores, banded.scores) and np.array_equal(whole.confidence, banded.confidence)


def test_memory_stays_far_below_a_dense_score_map():
    """Labels for the ADE-847-sized case without building 847 x 512 x 683 floats (1.2 GB):
    the process's peak memory grows by less than a quarter of that."""
    script = textwrap.dedent("""
        import resource, sys
        sys.path.insert(0, "tests")
        from test_san_postprocess import sharp_seeded_san
        from helpers import random_image
        from ovss_cli.datasets import benchmark_class_names
        from ovss_cli.vocabulary import Vocabulary
        segmenter = sharp_seeded_san()
        vocab = Vocabulary.for_benchmark(benchmark_class_names("ade847.txt"))
        segmenter.predict(random_image(64, 85), vocab)  # warm up: text, allocator
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        segmenter.predict(random_image(512, 683), vocab)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """)
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                               cwd=str(__import__("pathlib").Path(__file__).parents[1])).stdout.split()[-1])
    dense = 847 * 512 * 683 * 4
    assert grown < dense / 4, f"peak memory grew by {grown / 2**20:.0f} MiB"

"""`ovss compare` end to end on small seeded models: every output, the same numbers as `ovss
evaluate`, models shared between variants, resume, shards, and plain folders."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from helpers import build_layout, write_image, write_seeded_alpha_clip, write_seeded_sam
from ovss_cli.cli import app


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def models(tmp_path_factory, seeded_san):
    folder = tmp_path_factory.mktemp("compare-models")
    clip, alpha = write_seeded_alpha_clip(folder)
    sam = write_seeded_sam(folder / "sam.pth")
    sam_options = (f"weights={alpha},clip_weights={clip},sam_weights={sam},points_per_side=1,"
                   "pred_iou_thresh=0,stability_score_thresh=0,fill=nearest")
    return {"san": f"weights={seeded_san},resize_short=none", "sam": sam_options,
            "evaluate_sam": ["--method", "sam", "--weights", alpha, "--clip-weights", clip, "--sam-weights", sam,
                             "--points-per-side", "1", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
                             "--fill", "nearest"],
            "evaluate_san": ["--weights", seeded_san, "--resize-short", "0"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare-data")
    build_layout(root, "voc20", ["a", "b", "c"], size=(24, 32))
    return root


def variants(models) -> list[str]:
    return ["--variant", f"san=san:{models['san']}",
            "--variant", f"crop=sam:{models['sam']},region=crop",
            "--variant", f"blur, no filter=sam:{models['sam']},region=blur,containment_filter=false"]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, models, data):
    out = tmp_path_factory.mktemp("comparison")
    result = invoke("compare", "--dataset", "voc20", "--data-root", data, *variants(models), "--out", out,
                    "--device", "cpu")
    return result, out


class References(HTMLParser):
    """Every src / href of a page."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.found += [value for name, value in attrs if name in ("src", "href") and value]


def test_every_output_exists_and_parses(comparison):
    result, out = comparison
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "compare.json").read_text())
    assert [e["label"] for e in summary["entries"]] == ["san", "crop", "blur, no filter"]
    for entry in summary["entries"]:
        for key in ("mIoU", "fwIoU", "mACC", "pACC", "images_per_second", "seconds_per_image",
                    "seconds_per_image_p95", "peak_memory_mib", "parameters", "per_class_iou"):
            assert entry[key] is not None, (entry["label"], key)
        assert entry["images"] == 3 and entry["memory"] == "rss" and entry["peak_memory_mib"] > 50
    assert summary["entries"][1]["parameters"] == summary["entries"][2]["parameters"] > 0
    assert summary["gains_and_losses"]["first"] == "san" and summary["gains_and_losses"]["second"] == "crop"
    assert len(summary["agreement"]["fraction"]) == 3 and summary["agreement"]["fraction"][0][0] == 1.0
    sheets = sorted((out / "sheets").glob("*.png"))
    assert [p.stem for p in sheets] == ["a", "b", "c"]
    with Image.open(sheets[0]) as sheet:
        assert sheet.mode == "RGB" and sheet.width > 4 * sheet.height  # image, truth and 3 entries side by side
    with Image.open(out / "chart.png") as chart:
        assert chart.format == "PNG"
    # the table in the terminal
    text = " ".join(result.output.split())
    assert "ovss compare: dataset voc20" in text and "blur, no filter" in text


def test_the_report_is_self_contained(comparison):
    _, out = comparison
    page = (out / "report.html").read_text()
    assert "<table>" in page and "mIoU" in page and "blur, no filter" in page and "ovss compare" in page
    assert "<script" not in page and "@import" not in page and "url(" not in page
    refs = References()
    refs.feed(page)
    assert refs.found, "the report shows the chart and the sheets"
    for ref in refs.found:
        assert not re.match(r"^[a-z]+:", ref) and not ref.startswith("/"), ref  # relative, inside the folder
        assert (out / ref).resolve().is_file() and out.resolve() in (out / ref).resolve().parents, ref
    assert "ovss compare" in page and "torch" in page  # the command and the versions


def test_each_entry_scores_as_a_separate_evaluate_run(comparison, models, data, tmp_path):
    _, out = comparison
    summary = json.loads((out / "compare.json").read_text())
    runs = {"san": models["evaluate_san"], "crop": models["evaluate_sam"] + ["--region", "crop"],
            "blur, no filter": models["evaluate_sam"] + ["--region", "blur", "--no-filter"]}
    for entry in summary["entries"]:
        result = invoke("evaluate", "--dataset", "voc20", "--data-root", data, *runs[entry["label"]],
                        "--out", tmp_path / entry["folder"], "--json", "--device", "cpu")
        assert result.exit_code == 0, result.output
        metrics = json.loads(result.stdout)["metrics"]
        assert {k: entry[k] for k in ("mIoU", "fwIoU", "mACC", "pACC")} == \
            {k: metrics[k] for k in ("mIoU", "fwIoU", "mACC", "pACC")}
        assert entry["per_class_iou"] == {c["class"]: c["iou"] for c in metrics["per_class"]}


def test_variants_share_their_networks_and_a_rerun_reuses_finished_entries(models, data, tmp_path, monkeypatch):
    from ovss_cli.models.sam_alphaclip import segmenter as sam_module

    loads = []
    real = sam_module.load_sam
    monkeypatch.setattr(sam_module, "load_sam", lambda path: loads.append(path) or real(path))
    args = ["compare", "--dataset", "voc20", "--data-root", data, "--limit", "1",
            "--variant", f"crop=sam:{models['sam']},region=crop", "--variant", f"none=sam:{models['sam']},region=none",
            "--variant", f"plain=sam:{models['sam']},no_alpha=true", "--out", tmp_path, "--quiet", "--device", "cpu"]
    assert invoke(*args).exit_code == 0
    assert len(loads) == 1  # three variants, one SAM
    first = json.loads((tmp_path / "compare.json").read_text())
    loads.clear()
    assert invoke(*args).exit_code == 0
    assert loads == []  # everything was already there
    (tmp_path / "entries" / "none" / "entry.json").unlink()  # as if interrupted during that entry
    assert invoke(*args).exit_code == 0
    assert len(loads) == 1
    again = json.loads((tmp_path / "compare.json").read_text())
    assert [e["mIoU"] for e in again["entries"]] == [e["mIoU"] for e in first["entries"]]


def test_bad_entries_are_refused_before_any_model_loads(data, tmp_path, monkeypatch):
    from ovss_cli import segmenter

    monkeypatch.setattr(segmenter, "load_segmenter", lambda *a, **k: pytest.fail("a model was loaded"))
    for spec, fragment in (("x=sam:regoin=crop", "entry 'x': option --regoin does not apply to --method sam"),
                           ("x=sam:no_alpha=perhaps", "no_alpha='perhaps' is not a bool"),
                           ("x=magic:", "unknown method 'magic'"), ("blur", "write LABEL=METHOD:option=value")):
        result = invoke("compare", "--dataset", "voc20", "--data-root", data, "--variant", spec, "--out", tmp_path)
        assert result.exit_code == 2, result.output
        assert fragment in " ".join(result.output.split())
    both = invoke("compare", "--dataset", "voc20", "--data-root", data, "--weights", "x.pth", "--out", tmp_path)
    assert both.exit_code == 2 and "give it per entry" in both.output


def test_shards_merge_into_the_whole_comparison(models, data, comparison, tmp_path):
    _, whole = comparison
    parts = []
    for i in range(2):
        out = tmp_path / f"part{i}"
        result = invoke("compare", "--dataset", "voc20", "--data-root", data, *variants(models), "--out", out,
                        "--shard", f"{i}/2", "--quiet", "--device", "cpu")
        assert result.exit_code == 0, result.output
        parts.append(out)
    merged = tmp_path / "merged"
    result = invoke("merge", *parts, "--out", merged)
    assert result.exit_code == 0, result.output
    a, b = (json.loads((f / "compare.json").read_text()) for f in (whole, merged))
    for x, y in zip(a["entries"], b["entries"]):
        for key in ("label", "mIoU", "fwIoU", "mACC", "pACC", "per_class_iou", "images", "parameters"):
            assert x[key] == y[key], key
    assert a["agreement"] == b["agreement"] and a["sheets"] == b["sheets"]
    assert (merged / "report.html").is_file()


def test_plain_folders_compare_without_ground_truth(models, tmp_path):
    for name in ("x.jpg", "y.jpg"):
        write_image(tmp_path / "in" / name, len(name), (24, 32))
    out = tmp_path / "out"
    result = invoke("compare", tmp_path / "in", "--classes", "cat,sofa", "--distractors", "none",
                    "--variant", f"san=san:{models['san']}", "--variant", f"sam=sam:{models['sam']}",
                    "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "compare.json").read_text())
    assert not summary["has_ground_truth"] and "mIoU" not in summary["entries"][0]
    fraction = summary["agreement"]["fraction"]
    assert 0.0 <= fraction[0][1] <= 1.0 and fraction[0][1] == fraction[1][0]
    assert "pixels labelled alike" in result.output and "mIoU" not in result.output
    assert sorted(p.name for p in (out / "sheets").iterdir()) == ["x.png", "y.png"]
    assert summary["entries"][0]["class_share"]  # the chart's data
    assert (out / "entries" / "san" / "labels" / "x.png").is_file()  # a segment run, resumable as such

"""`ovss compare` end to end on small seeded models: every output, the same numbers as `ovss
evaluate`, the report's tables as a person reads them, models shared between variants, resume
(entry by entry and image by image), changed data, shards, and plain folders."""
from __future__ import annotations

import html
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from helpers import (build_layout, make_label, write_image, write_label, write_seeded_alpha_clip, write_seeded_sam,
                     write_seeded_san, write_shapes_dataset)
from ovss_cli.cli import app
from ovss_cli.datasets import DATASETS

REPO = Path(__file__).resolve().parents[1]


def invoke(*args: str):
    """The CLI in this process, in a terminal wide enough for the whole table."""
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def models(tmp_path_factory, seeded_san):
    folder = tmp_path_factory.mktemp("compare-models")
    clip, alpha = write_seeded_alpha_clip(folder)
    sam = write_seeded_sam(folder / "sam.pth")
    san1 = write_seeded_san(folder / "san-seed1.pth", seed=1)  # on the shapes it names two classes (seed 0: one)
    sam_options = (f"weights={alpha},clip_weights={clip},sam_weights={sam},points_per_side=1,"
                   "pred_iou_thresh=0,stability_score_thresh=0,fill=nearest")
    evaluate_sam = ["--method", "sam", "--weights", alpha, "--clip-weights", clip, "--sam-weights", sam,
                    "--points-per-side", "1", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
                    "--fill", "nearest"]
    return {"san": f"weights={seeded_san},resize_short=none", "san1": f"weights={san1},resize_short=none",
            "sam": sam_options, "evaluate_san": ["--weights", seeded_san, "--resize-short", "0"],
            "evaluate_san1": ["--weights", san1, "--resize-short", "0"], "evaluate_sam": evaluate_sam}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A voc20 dataset root (random labels)."""
    root = tmp_path_factory.mktemp("compare-data")
    build_layout(root, "voc20", ["a", "b", "c"], size=(24, 32))
    return root


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> list:
    """Coloured shapes in the generic layout, their ids holding dots (frame.000, ...): the
    --images / --labels / --classes-file arguments."""
    images, labels, classes = write_shapes_dataset(tmp_path_factory.mktemp("shapes"), 3, seed=3, size=48)
    for folder in (images, labels):
        for path in sorted(folder.iterdir()):
            path.rename(folder / path.name.replace("shape_", "frame.00"))
    return ["--images", images, "--labels", labels, "--classes-file", classes]


def variants(models) -> list[str]:
    """Entries that disagree on the shapes: SAN names the square and the triangle, SAM without
    alpha on blurred regions says background everywhere, SAM on crops the square."""
    return ["--variant", f"san=san:{models['san1']}",
            "--variant", f"blur, no alpha=sam:{models['sam']},region=blur,no_alpha=true",
            "--variant", f"crop, no filter=sam:{models['sam']},region=crop,containment_filter=false"]


def evaluate_arguments(models) -> dict[str, list]:
    """Each of :func:`variants`' entries as `ovss evaluate` options."""
    return {"san": models["evaluate_san1"],
            "blur, no alpha": models["evaluate_sam"] + ["--region", "blur", "--no-alpha"],
            "crop, no filter": models["evaluate_sam"] + ["--region", "crop", "--no-filter"]}


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, models, shapes):
    out = tmp_path_factory.mktemp("comparison")
    result = invoke("compare", *shapes, *variants(models), "--out", out, "--device", "cpu")
    return result, out


def summary_of(out: Path) -> dict:
    return json.loads((out / "compare.json").read_text())


class References(HTMLParser):
    """Every src / href of a page."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.found += [value for name, value in attrs if name in ("src", "href") and value]


class Tables(HTMLParser):
    """Every table of a page: rows of cell texts, the header row first."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def tables_of(page: str) -> list[list[list[str]]]:
    parser = Tables()
    parser.feed(page)
    return parser.tables


def test_every_output_exists_and_parses(comparison):
    result, out = comparison
    assert result.exit_code == 0, result.output
    summary = summary_of(out)
    assert [e["label"] for e in summary["entries"]] == ["san", "blur, no alpha", "crop, no filter"]
    for entry in summary["entries"]:
        for key in ("mIoU", "fwIoU", "mACC", "pACC", "images_per_second", "seconds_per_image",
                    "seconds_per_image_p95", "peak_memory_mib", "parameters", "per_class_iou"):
            assert entry[key] is not None, (entry["label"], key)
        assert entry["images"] == 3 and entry["memory"] == "rss" and entry["peak_memory_mib"] > 50
    assert summary["entries"][1]["parameters"] == summary["entries"][2]["parameters"] > 0
    # one sheet per image, although the ids differ only after a dot
    assert summary["sheets"] == ["sheets/frame.000.png", "sheets/frame.001.png", "sheets/frame.002.png"]
    assert sorted(p.name for p in (out / "sheets").iterdir()) == ["frame.000.png", "frame.001.png", "frame.002.png"]
    with Image.open(out / summary["sheets"][0]) as sheet:
        assert sheet.mode == "RGB" and sheet.width > 4 * sheet.height  # image, truth and 3 entries side by side
    with Image.open(out / "chart.png") as chart:
        assert chart.format == "PNG"
    # the table in a wide terminal: one table, every column
    assert "ovss compare: dataset custom" in " ".join(result.output.split())
    assert any(all(h in line for h in ("entry", "mIoU", "images/s", "peak MiB", "failed"))
               for line in result.output.splitlines())


def test_the_summary_table_has_every_column_in_the_report_and_an_80_column_terminal(comparison):
    from ovss_cli.reporting import print_comparison

    _, out = comparison
    summary = summary_of(out)
    table = tables_of((out / "report.html").read_text())[0]
    assert table[0] == ["entry", "method", "model", "mIoU", "fwIoU", "mACC", "pACC", "images/s", "s/image",
                        "p95 s/image", "peak memory (MiB)", "parameters (M)", "failed"]
    for row, e in zip(table[1:], summary["entries"], strict=True):
        assert row == [e["label"], e["method"], e["model"], *[f"{e[k]:.2f}" for k in ("mIoU", "fwIoU", "mACC", "pACC")],
                       f"{e['images_per_second']:.2f}", f"{e['seconds_per_image']:.3f}",
                       f"{e['seconds_per_image_p95']:.3f}", f"{e['peak_memory_mib']:.0f} (rss)",
                       f"{e['parameters'] / 1e6:.1f}", "0"]

    text = io.StringIO()
    print_comparison(summary, out, Console(file=text, width=80))
    lines = text.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in text.getvalue()  # nothing cut
    cells = {cell.strip() for line in lines for cell in re.split("[│┃]", line)}
    for e in summary["entries"]:
        assert {f"{e[k]:.2f}" for k in ("mIoU", "fwIoU", "mACC", "pACC", "images_per_second")} <= cells
        assert {f"{e['seconds_per_image']:.3f}", f"{e['seconds_per_image_p95']:.3f}", f"{e['peak_memory_mib']:.0f}",
                f"{e['parameters'] / 1e6:.1f}"} <= cells
    words = " ".join(lines)
    for title in ("entry", "method", "model", "mIoU", "fwIoU", "mACC", "pACC", "images/s", "s/image", "p95 s",
                  "peak MiB (rss)", "params (M)", "failed"):
        assert all(word in words for word in title.split()), title


def test_gains_and_losses_are_the_largest_changes_between_the_first_two_entries(comparison):
    _, out = comparison
    summary = summary_of(out)
    first, second = (e["per_class_iou"] for e in summary["entries"][:2])
    deltas = sorted(((c, second[c] - first[c]) for c in first), key=lambda d: d[1])
    gains, losses = [d for d in reversed(deltas) if d[1] > 0][:5], [d for d in deltas if d[1] < 0][:5]
    assert gains and losses  # the fixture's entries differ both ways
    changes = summary["gains_and_losses"]
    assert (changes["first"], changes["second"]) == ("san", "blur, no alpha")
    assert [(c["class"], c["change"]) for c in changes["gains"]] == gains
    assert [(c["class"], c["change"]) for c in changes["losses"]] == losses
    assert all((c["first"], c["second"]) == (first[c["class"]], second[c["class"]])
               for c in changes["gains"] + changes["losses"])
    shown = tables_of((out / "report.html").read_text())[1]
    assert shown[0] == ["class", "change", "san", "blur, no alpha"]
    assert [(r[0], r[1]) for r in shown[1:]] == [(c, f"{d:+.2f}") for c, d in gains + losses]


def test_the_report_is_self_contained(comparison):
    _, out = comparison
    page = (out / "report.html").read_text()
    assert "<table>" in page and "mIoU" in page and "blur, no alpha" in page
    assert "<script" not in page and "@import" not in page and "url(" not in page
    refs = References()
    refs.feed(page)
    assert refs.found, "the report shows the chart and the sheets"
    for ref in refs.found:
        assert not re.match(r"^[a-z]+:", ref) and not ref.startswith("/"), ref  # relative, inside the folder
        assert (out / ref).resolve().is_file() and out.resolve() in (out / ref).resolve().parents, ref
    assert "torch" in page  # the versions


def test_each_entry_scores_as_a_separate_evaluate_run(comparison, models, shapes, tmp_path):
    _, out = comparison
    runs = evaluate_arguments(models)
    for entry in summary_of(out)["entries"]:
        result = invoke("evaluate", *shapes, *runs[entry["label"]], "--out", tmp_path / entry["folder"], "--json",
                        "--device", "cpu")
        assert result.exit_code == 0, result.output
        metrics = json.loads(result.stdout)["metrics"]
        assert {k: entry[k] for k in ("mIoU", "fwIoU", "mACC", "pACC")} == \
            {k: metrics[k] for k in ("mIoU", "fwIoU", "mACC", "pACC")}
        assert entry["per_class_iou"] == {c["class"]: c["iou"] for c in metrics["per_class"]}


def test_shards_merge_into_the_whole_comparison(models, shapes, comparison, tmp_path):
    _, whole = comparison
    parts = []
    for i in range(2):
        out = tmp_path / f"part{i}"
        result = invoke("compare", *shapes, *variants(models), "--out", out, "--shard", f"{i}/2", "--quiet",
                        "--device", "cpu")
        assert result.exit_code == 0, result.output
        parts.append(out)
    merged = tmp_path / "merged"
    result = invoke("merge", *parts, "--out", merged)
    assert result.exit_code == 0, result.output
    a, b = summary_of(whole), summary_of(merged)
    for x, y in zip(a["entries"], b["entries"]):
        for key in ("label", "mIoU", "fwIoU", "mACC", "pACC", "per_class_iou", "images", "parameters"):
            assert x[key] == y[key], key
    assert a["agreement"] == b["agreement"] and a["sheets"] == b["sheets"]
    assert a["gains_and_losses"] == b["gains_and_losses"]
    assert (merged / "report.html").is_file()


def test_variants_share_their_networks_and_a_rerun_reuses_finished_entries(models, data, tmp_path, monkeypatch):
    from ovss_cli.models.sam_alphaclip import segmenter as sam_module
    from ovss_cli.models.san import segmenter as san_module

    loads = []
    for module, name in ((sam_module, "load_sam"), (sam_module, "load_alpha_clip"), (san_module, "read_san_checkpoint")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name, **k: loads.append(name) or real(*a, **k))
    args = ["compare", "--dataset", "voc20", "--data-root", data, "--limit", "1",
            "--variant", f"crop=sam:{models['sam']},region=crop", "--variant", f"none=sam:{models['sam']},region=none",
            "--variant", f"plain=sam:{models['sam']},no_alpha=true", "--variant", f"san=san:{models['san']}",
            "--variant", f"san photo=san:{models['san']},templates=photo", "--out", tmp_path, "--quiet",
            "--device", "cpu"]
    assert invoke(*args).exit_code == 0
    # five entries, one SAM, one Alpha-CLIP (with its CLIP), one SAN
    assert sorted(loads) == ["load_alpha_clip", "load_sam", "read_san_checkpoint"]
    first = summary_of(tmp_path)
    loads.clear()
    assert invoke(*args).exit_code == 0
    assert loads == []  # everything was already there
    (tmp_path / "entries" / "none" / "entry.json").unlink()  # as if interrupted during that entry
    assert invoke(*args).exit_code == 0
    assert sorted(loads) == ["load_alpha_clip", "load_sam"]
    again = summary_of(tmp_path)
    assert [e["mIoU"] for e in again["entries"]] == [e["mIoU"] for e in first["entries"]]


def test_an_interrupted_dataset_entry_resumes_image_by_image(models, data, tmp_path, monkeypatch):
    from ovss_cli import evaluate as evaluate_module

    real = evaluate_module.predict_robustly
    segmented = []

    def interrupted_at_the_second(*args, **kwargs):
        segmented.append(1)
        if len(segmented) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "predict_robustly", interrupted_at_the_second)
    args = ["compare", "--dataset", "voc20", "--data-root", data, "--variant", f"san=san:{models['san']}",
            "--out", tmp_path / "cmp", "--quiet", "--device", "cpu"]
    assert invoke(*args).exit_code == 130
    entry = tmp_path / "cmp" / "entries" / "san"
    assert not (entry / "entry.json").exists() and [p.name for p in (entry / "predictions").iterdir()] == ["a.png"]

    segmented.clear()
    monkeypatch.setattr(evaluate_module, "predict_robustly", lambda *a, **k: segmented.append(1) or real(*a, **k))
    assert invoke(*args).exit_code == 0
    assert len(segmented) == 2  # b and c; a's saved prediction was scored again, not segmented
    resumed = summary_of(tmp_path / "cmp")["entries"][0]
    whole = invoke("evaluate", "--dataset", "voc20", "--data-root", data, *models["evaluate_san"],
                   "--out", tmp_path / "eval", "--json", "--device", "cpu")
    metrics = json.loads(whole.stdout)["metrics"]
    assert {k: resumed[k] for k in ("mIoU", "fwIoU", "mACC", "pACC")} == {k: metrics[k] for k in
                                                                          ("mIoU", "fwIoU", "mACC", "pACC")}
    stored = json.loads((entry / "entry.json").read_text())
    assert stored["images"] == 3 and len(stored["image_seconds"]) == 3  # both runs' images are timed
    assert stored["seconds"] >= sum(stored["image_seconds"])  # each run's wall time up to its last image
    assert resumed["images_per_second"] == pytest.approx(3 / stored["seconds"])

    # nothing left to segment: the speed stays that of the runs that did the work
    (entry / "entry.json").unlink()
    segmented.clear()
    assert invoke(*args).exit_code == 0
    assert segmented == [] and summary_of(tmp_path / "cmp")["entries"][0]["images_per_second"] == \
        resumed["images_per_second"]


def test_results_on_changed_data_are_not_reused(models, tmp_path, monkeypatch):
    from ovss_cli import evaluate as evaluate_module

    root = tmp_path / "data"
    build_layout(root, "voc20", ["a", "b"], size=(24, 32))
    real = evaluate_module.predict_robustly
    segmented = []
    monkeypatch.setattr(evaluate_module, "predict_robustly", lambda *a, **k: segmented.append(1) or real(*a, **k))
    args = ["compare", "--dataset", "voc20", "--data-root", root, "--variant", f"san=san:{models['san']}",
            "--out", tmp_path / "cmp", "--quiet", "--device", "cpu"]
    assert invoke(*args).exit_code == 0 and len(segmented) == 2
    segmented.clear()
    assert invoke(*args).exit_code == 0 and segmented == []  # same data: reused
    # the same file names with other labels (an edited dataset)
    spec = DATASETS["voc20"]
    for n, sample_id in enumerate(["a", "b"]):
        write_label(root / spec.label_dir / f"{sample_id}{spec.label_ext}", "voc20", make_label("voc20", 10 + n, (24, 32)))
    assert invoke(*args).exit_code == 0 and len(segmented) == 2
    entry = summary_of(tmp_path / "cmp")["entries"][0]
    fresh = invoke("evaluate", "--dataset", "voc20", "--data-root", root, *models["evaluate_san"],
                   "--out", tmp_path / "eval", "--json", "--device", "cpu")
    assert entry["mIoU"] == json.loads(fresh.stdout)["metrics"]["mIoU"]
    # another root holding other data under the same names
    other = tmp_path / "other"
    build_layout(other, "voc20", ["a", "b"], size=(24, 32))
    segmented.clear()
    assert invoke(*args[:4], other, *args[5:]).exit_code == 0 and len(segmented) == 2


def test_bad_entries_are_refused_before_any_model_loads(models, data, tmp_path, monkeypatch):
    from ovss_cli import segmenter
    from ovss_cli.compare import run as compare_run

    for module in (segmenter, compare_run):  # the name compare/run.py calls, and the library's
        monkeypatch.setattr(module, "load_segmenter", lambda *a, **k: pytest.fail("a model was loaded"))
    good = ["--variant", f"san=san:{models['san']}"]  # a valid entry first: nothing runs before the bad one
    for spec, code, fragment in (
            ("x=sam:regoin=crop", 2, "entry 'x': option --regoin does not apply to --method sam"),
            ("x=sam:no_alpha=perhaps", 2, "no_alpha='perhaps' is not a bool"),
            ("x=magic:", 2, "unknown method 'magic'"), ("blur", 2, "write LABEL=METHOD:option=value"),
            ("x=sam:region=circle", 2, "entry 'x': unknown --region 'circle'"),
            ("x=sam:fill=everywhere", 2, "entry 'x': unknown --fill 'everywhere'"),
            ("x=san:precision=xyz", 2, "entry 'x': unknown precision 'xyz'"),
            ("x=sam:min_score=2", 2, "entry 'x': --min-score must be a probability"),
            ("x=san:model=san-vit-x", 2, "entry 'x': unknown SAN model 'san-vit-x'"),
            ("x=sam:sam_weights=/no/such/sam.pth", 4, "entry 'x': checkpoint not found: /no/such/sam.pth")):
        result = invoke("compare", "--dataset", "voc20", "--data-root", data, *good, "--variant", spec,
                        "--out", tmp_path / "out")
        assert result.exit_code == code, result.output
        assert fragment in " ".join(result.output.split())
    both = invoke("compare", "--dataset", "voc20", "--data-root", data, "--weights", "x.pth", "--out", tmp_path / "out")
    assert both.exit_code == 2 and "give it per entry" in both.output
    assert not (tmp_path / "out").exists()


def test_a_dataset_compared_with_another_vocabulary_scores_semantic_similarity(models, data, tmp_path):
    vocabulary = tmp_path / "vocabulary.txt"
    vocabulary.write_text("animal\nvehicle\nfurniture\nplant\n")
    out = tmp_path / "cmp"
    result = invoke("compare", "--dataset", "voc20", "--data-root", data, "--vocabulary-file", vocabulary,
                    "--variant", f"seed 1=san:{models['san1']}", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = summary_of(out)
    for entry, options in zip(summary["entries"], [models["evaluate_san1"]], strict=True):
        assert "mIoU" not in entry
        alone = invoke("evaluate", "--dataset", "voc20", "--data-root", data, "--vocabulary-file", vocabulary,
                       *options, "--out", tmp_path / entry["folder"], "--json", "--device", "cpu")
        assert alone.exit_code == 0, alone.output
        assert entry["semantic_similarity"] == json.loads(alone.stdout)["semantic_similarity"]
    table = tables_of((out / "report.html").read_text())[0]
    assert table[0][3:5] == ["sem. similarity", "rescaled"]
    assert [row[3] for row in table[1:]] == [f"{e['semantic_similarity']['mean_similarity']:.4f}"
                                             for e in summary["entries"]]
    assert summary["classes"] == ["animal", "vehicle", "furniture", "plant"]


def test_plain_folders_compare_without_ground_truth(models, shapes, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(shapes[1], folder)  # frame.000.png ... frame.002.png
    write_image(folder / "zz.png", 0, (48, 48))  # fourth in walk order: left out by --limit 3
    out = tmp_path / "out"
    args = ["compare", folder, "--classes-file", shapes[5], "--distractors", "none", "--limit", "3",
            "--variant", f"san=san:{models['san1']}", "--variant", f"sam=sam:{models['sam']},containment_filter=false",
            "--out", out, "--device", "cpu"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    summary = summary_of(out)
    assert not summary["has_ground_truth"] and "mIoU" not in summary["entries"][0]
    assert summary["images"] == 3 and [e["images"] for e in summary["entries"]] == [3, 3]  # --limit 3 of 4
    assert sorted(p.name for p in (out / "sheets").iterdir()) == ["frame.000.png", "frame.001.png", "frame.002.png"]
    # how often the two entries agree, counted here from their saved label maps
    maps = {label: np.concatenate([np.asarray(Image.open(out / "entries" / label / "labels" / f"frame.00{i}.png"))
                                   .ravel() for i in range(3)]) for label in ("san", "sam")}
    alike = float(np.mean(maps["san"] == maps["sam"]))
    assert 0 < alike < 1  # they agree on some pixels only: the fraction is not a default
    assert summary["agreement"] == {"labels": ["san", "sam"], "fraction": [[1.0, alike], [alike, 1.0]]}
    assert "pixels labelled alike" in result.output and "mIoU" not in result.output
    assert summary["entries"][0]["class_share"]  # the chart's data
    # a resumed entry (segment run) keeps the speed of the run that segmented its images
    (out / "entries" / "san" / "entry.json").unlink()
    assert invoke(*args).exit_code == 0
    assert summary_of(out)["entries"][0]["images_per_second"] == summary["entries"][0]["images_per_second"]


def test_plain_folder_selection_is_the_dataset_selection(tmp_path):
    from ovss_cli.compare import Source
    from ovss_cli.datasets import select_indices

    names = [f"{i:02d}.png" for i in range(10)]
    for n, name in enumerate(names):
        write_image(tmp_path / "in" / name, n)
    write_image(tmp_path / "in" / "out" / "sheet.png", 0)  # the comparison's own folder
    chosen = Source(paths=[str(tmp_path / "in")], subset=0.3, limit=2).inputs(exclude=[tmp_path / "in" / "out"])
    assert [i.path.name for i in chosen] == [names[k] for k in select_indices(10, limit=2, subset=0.3)]
    assert len(Source(paths=[str(tmp_path / "in")]).inputs(exclude=[tmp_path / "in" / "out"])) == 10


def test_the_report_holds_the_exact_command(models, tmp_path):
    write_image(tmp_path / "in" / "x.png", 0, (24, 32))
    args = ["compare", str(tmp_path / "in"), "--classes", "cat, a sofa", "--distractors", "none",
            "--variant", f"it's san=san:{models['san']}", "--out", str(tmp_path / "out"), "--quiet", "--device", "cpu"]
    subprocess.run([sys.executable, "-m", "ovss_cli", *args], check=True, cwd=REPO, timeout=600)
    page = (tmp_path / "out" / "report.html").read_text()
    assert f"<pre>{html.escape(shlex.join(['ovss', *args]))}</pre>" in page

"""``ovss merge``: join the folders that shards wrote into the folder one run would have written.

- ``segment`` folders: label and overlay trees are copied, the shards' rows are joined in input
  order, and ``classes.json``, ``manifest.jsonl`` and ``coco.json`` (ids renumbered in input
  order) are written as an unsharded run writes them. Shards made with other settings (another
  vocabulary, model, options or formats) are refused, naming the difference.
- ``evaluate`` folders: confusion matrices (or open-vocabulary word counts) are summed and the
  metrics of the whole dataset computed from them; failures are listed together.
"""
from __future__ import annotations

import heapq
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import UsageError
from ..io.atomic import atomic_open
from . import state as run_state


@dataclass
class MergeResult:
    kind: str  # "segment" or "evaluate"
    sources: int
    images: int
    failed: int
    paths: dict[str, str]


def _kind(folder: Path) -> str:
    if (folder / "compare.json").is_file() and (folder / "entries").is_dir():
        return "compare"
    if (run_state.state_dir(folder) / "run.json").is_file():
        return "segment"
    if (folder / "metrics.json").is_file():
        return "evaluate"
    raise UsageError(f"{folder} is not an output folder of `ovss segment` (no .ovss/run.json), `ovss evaluate` "
                     "(no metrics.json) or `ovss compare` (no compare.json)")


def merge_folders(sources: Sequence[str | Path], out: str | Path) -> MergeResult:
    """Merge shard folders of one kind into ``out`` (see the module docstring)."""
    folders = [Path(s) for s in sources]
    out = Path(out)
    if not folders:
        raise UsageError("give the shard folders to merge, e.g. ovss merge out-0 out-1 out-2 --out merged")
    for folder in folders:
        if not folder.is_dir():
            raise UsageError(f"shard folder not found: {folder}")
        if folder.resolve() == out.resolve():
            raise UsageError(f"--out {out} is one of the folders to merge; merge into a new folder")
    kinds = {_kind(f) for f in folders}
    if len(kinds) > 1:
        raise UsageError(f"cannot merge folders of different commands together ({', '.join(sorted(kinds))})")
    merge = {"segment": _merge_segment, "evaluate": _merge_evaluation, "compare": _merge_comparison}[kinds.pop()]
    return merge(folders, out)


def _same(values: list[Any], folders: list[Path], what: str) -> Any:
    """The value all shards share, or an error naming the first that differs and how."""
    for folder, value in zip(folders[1:], values[1:]):
        if value != values[0]:
            diff = run_state.identity_differences(values[0], value) if isinstance(value, dict) else [
                f"{values[0]!r} vs {value!r}"]
            raise UsageError(f"{folder} was made with other {what} than {folders[0]} ({'; '.join(diff[:3])}); "
                             "only shards of one run can be merged")
    return values[0]


def _merge_segment(folders: list[Path], out: Path) -> MergeResult:
    from ..segment import write_run_files_from

    identity = _same([run_state.read_identity(f) for f in folders], folders, "settings")
    finals = [run_state.read_final(f) for f in folders]
    for folder, final in zip(folders, finals):
        if final is None:
            raise UsageError(f"{folder} holds no completed run: run its `ovss segment` command again to finish it")
    legend = _same([(f / "classes.json").read_bytes() for f in folders], folders, "classes.json")
    with run_state.locked(out):
        run_state.prepare(out, identity, overwrite=False)
        generation = run_state.new_generation()
        for stale in run_state.state_dir(out).glob("*.sqlite"):
            stale.unlink()
        state = run_state.RunState(out, "merged", generation)
        images = failed = 0
        seen: set[str] = set()
        try:
            streams = [_tagged(f, run_state.records(f, writers, gen)) for f, (gen, writers) in zip(folders, finals)]
            for folder, record in heapq.merge(*streams, key=lambda tagged: tagged[1].pos):
                if record.rel in seen:
                    raise UsageError(f"input {record.rel} is in more than one shard ({folder} among them); "
                                     "shards must split one run's inputs")
                seen.add(record.rel)
                for rel in record.files:
                    target = out / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(folder / rel, target)
                state.record(record)
                images += 1
                failed += not record.ok
        finally:
            state.close()
        with atomic_open(out / "classes.json", "wb") as handle:
            handle.write(legend)
        paths = {"classes": str(out / "classes.json")}
        paths.update(write_run_files_from(out, identity, generation, ["merged"]))
    return MergeResult("segment", len(folders), images, failed, paths)


def _tagged(folder: Path, records):
    for record in records:
        yield folder, record


def _merge_evaluation(folders: list[Path], out: Path) -> MergeResult:
    from ..evaluate import EvaluationResult, WordCounts, finish_evaluation, write_evaluation
    from ..metrics import ConfusionMatrix

    reports = [json.loads((f / "metrics.json").read_text(encoding="utf-8")) for f in folders]
    for folder, report in zip(folders, reports):
        if "run" not in report:
            raise UsageError(f"{folder}/metrics.json does not say how it was made (an older ovss?); "
                             "evaluate the shards again")
    identity = _same([r["run"] for r in reports], folders, "evaluation settings")
    shards = [r.get("shard") for r in reports]
    if len({(s or {}).get("index") for s in shards}) < len(shards):
        raise UsageError("the same shard appears twice among the folders to merge")
    first = reports[0]
    described = {k: v for k, v in first.items() if k not in _REPORT_KEYS}  # the segmenter's description
    result = EvaluationResult(first["dataset"], described, identity["classes"], synonyms=first["synonyms"])
    result.identity = identity
    result.images = sum(r["images"] for r in reports)
    result.failed = sum(r["failed"] for r in reports)
    result.failures = [(f["input"], f["error"]) for r in reports for f in r["failures"]]
    result.warnings = [(w["input"], w["warning"]) for r in reports for w in r.get("warnings", [])]
    result.seconds = sum(r["seconds"] for r in reports)
    counts = sorted({s["count"] for s in shards if s}) if any(shards) else []
    if counts and len(counts) == 1 and len(folders) < counts[0]:
        raise UsageError(f"only {len(folders)} of {counts[0]} shards given; merge all of them")
    confusion = word_counts = rows = None
    if all((f / "confusion.npy").is_file() for f in folders):
        matrices = [np.load(f / "confusion.npy") for f in folders]
        confusion = ConfusionMatrix.from_matrix(np.sum(matrices, axis=0))
    elif all((f / "word_counts.npz").is_file() for f in folders):
        word_counts = WordCounts(len(result.class_names))
        similarity: dict[str, np.ndarray] = {}
        for f in folders:
            with np.load(f / "word_counts.npz") as data:
                part = WordCounts(len(result.class_names))
                for word, row, sim in zip(data["words"].tolist(), data["counts"], data["similarity"]):
                    part.add(word, row)
                    similarity.setdefault(word, sim)
                part.unlabelled = data["unlabelled"].astype(np.int64)
                word_counts.merge(part)
        rows = np.stack([similarity[w] for w in word_counts.words]) if word_counts.words else None
    finish_evaluation(result, confusion, word_counts, None, result.class_names, similarity_rows=rows)
    paths = write_evaluation(result, out)
    return MergeResult("evaluate", len(folders), result.images, result.failed, paths)


# metrics.json keys that are not the segmenter's description
_REPORT_KEYS = {"dataset", "synonyms", "images", "failed", "partial", "seconds", "images_per_second", "failures",
                "warnings", "shard", "run", "metrics", "semantic_similarity", "word_class_pixels"}


def _merge_comparison(folders: list[Path], out: Path) -> MergeResult:
    """Each entry's shard folders merged as segment or evaluate folders (with their saved
    predictions), timings joined, the images and contact sheets gathered, the report rebuilt."""
    from ..compare import build_report
    from ..compare.run import ENTRY_FILE, EntryResult, read_entry
    from ..compare.summary import read_image_rows, write_image_rows
    from ..io.atomic import atomic_write_text

    infos = [json.loads((f / "compare.json").read_text(encoding="utf-8")) for f in folders]
    _same([[e["label"] for e in i["entries"]] for i in infos], folders, "entries")
    shards = [tuple(i["shard"]) if i.get("shard") else None for i in infos]
    if None in shards or len(set(shards)) < len(shards) or len(folders) < shards[0][1]:
        raise UsageError("merge every shard of one comparison, each once (its folders' compare.json name their shard)")
    order = [e["label"] for e in infos[0]["entries"]]
    results, folder_names = [], []
    for label in order:
        name = next(e["folder"] for e in infos[0]["entries"] if e["label"] == label).split("/", 1)[1]
        parts = [f / "entries" / name for f in folders]
        stored = [read_entry(p) for p in parts]
        if any(s is None for s in stored):
            raise UsageError(f"entry {label!r} is unfinished in one of the shards; run that shard again")
        identities = [{**s.identity, "shard": None} for s in stored]
        identity = _same(identities, parts, f"settings for entry {label!r}")
        target = out / "entries" / name
        merge_folders(parts, target)
        for part in parts:  # the label maps the report reads
            if (part / "predictions").is_dir():
                for png in (part / "predictions").rglob("*.png"):
                    dest = target / png.relative_to(part)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(png, dest)
        first = stored[0]
        merged = EntryResult(first.label, first.method, first.describe, first.parameters,
                             sum(s.images for s in stored), sum(s.failed for s in stored),
                             sum(s.seconds for s in stored), [t for s in stored for t in s.image_seconds],
                             max(s.peak_memory for s in stored), first.memory_kind,
                             max(s.load_seconds for s in stored), {**identity, "shard": [0, 1]})
        atomic_write_text(target / ENTRY_FILE, json.dumps(merged.to_dict(), indent=2) + "\n")
        results.append(merged)
        folder_names.append(name)
    rows = sorted((r for f in folders for r in read_image_rows(f)), key=lambda r: r["pos"])
    write_image_rows(out, rows)
    sheets = []
    for f, info in zip(folders, infos):
        for rel in info.get("sheets", []):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f / rel, out / rel)
            sheets.append(rel)
    info = {k: v for k, v in infos[0].items() if k not in ("entries", "agreement", "images", "gains_and_losses",
                                                           "sheets", "chart")}
    info["shard"] = None
    summary = build_report(out, results, folder_names, rows, info, _sheet_order(sheets, rows))
    return MergeResult("compare", len(folders), summary["images"],
                       sum(e["failed"] for e in summary["entries"]), {"report": str(out / "report.html")})


def _sheet_order(sheets: list[str], rows: list[dict]) -> list[str]:
    """Contact sheets in input order."""
    position = {r["sheet"]: r["pos"] for r in rows}
    return sorted(sheets, key=lambda rel: position.get(rel, len(position)))

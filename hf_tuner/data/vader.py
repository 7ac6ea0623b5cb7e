"""Human-rated sentiment snippets: the vaderSentiment ground-truth files (Hutto & Gilbert, ICWSM 2014).

Four files, `<source>_GroundTruth.txt`, each line `id<TAB>mean_rating<TAB>text` (CRLF endings); the
mean rating of about 20 raters runs from -4 to +4. One reader serves every task built on them:
polarity (rating > 0, near-neutral rows dropped), rating regression and source classification.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hf_tuner.data.files import DataError, read_text

SOURCES = ("movieReviewSnippets", "tweets", "amazonReviewSnippets", "nytEditorialSnippets")
POLARITY_LABELS = ["negative", "positive"]


@dataclass
class VaderArguments:
    """Config fields of the vader data source; recipes mix them into their run arguments."""

    vader_sources: list[str] | None = field(
        default=None, metadata={"help": f"which ground-truth files to read (None: all of {', '.join(SOURCES)})"})
    min_abs_rating: float = field(
        default=0.5, metadata={"help": "polarity: drop rows whose |mean rating| is below this (near-neutral)"})


def ground_truth_folder(dataset_name: str) -> Path:
    """The asset `vader-sentiment`, or a local folder holding *_GroundTruth.txt files."""
    from hf_tuner import assets

    folder = Path(assets.resolve(dataset_name)) if dataset_name in assets.ASSETS else Path(dataset_name).expanduser()
    if not folder.is_dir() or not list(folder.glob("*_GroundTruth.txt")):
        raise DataError(f"dataset_name {dataset_name!r}: expected the asset vader-sentiment or a folder of "
                        "<source>_GroundTruth.txt files")
    return folder


def read_ground_truth(dataset_name: str = "vader-sentiment", sources: list[str] | None = None) -> list[dict]:
    """Rows {"id", "text", "rating", "source", "group"}; `group` (the lower-cased text) is the split unit,
    so a snippet that occurs twice can never sit on both sides of a train/held-out split."""
    folder = ground_truth_folder(dataset_name)
    available = sorted(p.name[:-len("_GroundTruth.txt")] for p in folder.glob("*_GroundTruth.txt"))
    wanted = list(sources) if sources else available
    unknown = [s for s in wanted if s not in available]
    if unknown:
        raise DataError(f"vader_sources: unknown source(s) {unknown}; {folder} has {available}")
    rows = []
    for source in wanted:
        path = folder / f"{source}_GroundTruth.txt"
        for n, line in enumerate(read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split("\t", 2)
            if len(parts) != 3:
                raise DataError(f"{path} line {n}: expected id<TAB>rating<TAB>text")
            try:
                rating = float(parts[1])
            except ValueError as e:
                raise DataError(f"{path} line {n}: rating {parts[1]!r} is not a number") from e
            text = parts[2].strip()
            if text:
                rows.append({"id": f"{source}/{parts[0]}", "text": text, "rating": rating, "source": source,
                             "group": " ".join(text.lower().split())})
    if not rows:
        raise DataError(f"{folder}: no rows in {wanted}")
    return rows


def polarity_rows(rows: list[dict], min_abs_rating: float = 0.5) -> list[dict]:
    """Binary sentiment: label "positive" if rating > 0; rows with |rating| < min_abs_rating are dropped."""
    return [{**r, "label": POLARITY_LABELS[int(r["rating"] > 0)]} for r in rows if abs(r["rating"]) >= min_abs_rating]


# The tasks these files support: name -> (kind, labels); labels of `source` are the sources read.
TASKS = {"polarity": "classification", "rating": "regression", "source": "classification"}


def task_labels(task: str, sources: list[str]) -> list[str] | None:
    return {"polarity": POLARITY_LABELS, "rating": None, "source": sorted(sources)}[task]


def task_rows(rows: list[dict], task: str, min_abs_rating: float = 0.5) -> list[dict]:
    """Rows {"text", "group", "label" | "target"} for one task: polarity (near-neutral rows dropped),
    rating (the mean rating, -4..4, as a regression target) or source (which file the snippet is from)."""
    if task not in TASKS:
        raise DataError(f"unknown vader task {task!r}; known: {list(TASKS)}")
    if task == "polarity":
        return [{"text": r["text"], "group": r["group"], "label": r["label"]} for r in polarity_rows(rows, min_abs_rating)]
    if task == "rating":
        return [{"text": r["text"], "group": r["group"], "target": r["rating"]} for r in rows]
    return [{"text": r["text"], "group": r["group"], "label": r["source"]} for r in rows]

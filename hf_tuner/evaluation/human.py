"""Human evaluation from blind A/B judgments (`hf-tuner label ab`): win rate, ties, agreement, report section.

- Win rate of tuned over base = tuned wins / (tuned wins + base wins): ties are left out of it and
  reported on their own as the tie rate (ties / all judgments). Its 95% confidence interval is the
  Wilson score interval, which stays inside [0, 1] and behaves at small n, where the normal
  approximation does not. Judgments are counted as independent, which they are not quite when
  several annotators judge the same prompts.
- Agreement: Cohen's kappa for each pair of annotators over the prompts both judged, on the three
  labels tuned / base / tie (who won, not which side they clicked: each saw its own layout).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from itertools import combinations
from pathlib import Path

from hf_tuner.data.files import DataError

WINNERS = ("tuned", "base", "tie")
SECTION = "## Human evaluation (blind A/B)"


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """Wilson score interval for a binomial proportion; None when n == 0."""
    if n == 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def cohen_kappa(a: list[str], b: list[str]) -> float | None:
    """(p_o - p_e) / (1 - p_e) for two raters' labels of the same items; None when p_e == 1 (undefined)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"kappa needs two equal, non-empty lists of labels (got {len(a)} and {len(b)})")
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[k] * cb[k] for k in set(ca) | set(cb)) / (n * n)
    if p_e == 1:
        return None
    return (p_o - p_e) / (1 - p_e)


def read_judgments(paths: list[str | Path]) -> tuple[list[dict], int]:
    """(judgments, duplicates left out): rows {item_id, annotator, winner, ...}; an annotator's first judgment
    of an item counts (the same file given twice, or two files holding the same rows)."""
    rows, seen, duplicates = [], set(), 0
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"judgments file not found: {path}")
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} row {i}: not valid JSON ({e.msg})") from e
            missing = [c for c in ("item_id", "annotator", "winner") if not isinstance(row, dict) or c not in row]
            if missing:
                raise DataError(f"{path} row {i}: no {', '.join(missing)}: not a blind A/B judgment "
                                "(written by `hf-tuner label ab`)")
            if row["winner"] not in WINNERS:
                raise DataError(f"{path} row {i}: winner {row['winner']!r}, expected one of {WINNERS}")
            key = (row["annotator"], row["item_id"])
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            rows.append(row)
    if not rows:
        raise DataError(f"{', '.join(map(str, paths))}: no judgments")
    return rows, duplicates


def summarize(rows: list[dict]) -> dict:
    """Counts, win rate with its Wilson 95% interval, tie rate, and pairwise kappa between annotators."""
    counts = Counter(r["winner"] for r in rows)
    wins, losses, ties = counts["tuned"], counts["base"], counts["tie"]
    decisive = wins + losses
    ci = wilson_interval(wins, decisive)
    by_annotator: dict[str, dict[str, str]] = {}
    for r in rows:
        by_annotator.setdefault(r["annotator"], {})[r["item_id"]] = r["winner"]
    agreement = []
    for a, b in combinations(sorted(by_annotator), 2):
        shared = sorted(set(by_annotator[a]) & set(by_annotator[b]))
        if shared:
            la, lb = [by_annotator[a][i] for i in shared], [by_annotator[b][i] for i in shared]
            agreement.append({"annotators": [a, b], "items": len(shared), "kappa": cohen_kappa(la, lb),
                              "raw_agreement": sum(x == y for x, y in zip(la, lb)) / len(shared)})
    return {"judgments": len(rows), "items": len({r["item_id"] for r in rows}),
            "annotators": {a: len(v) for a, v in sorted(by_annotator.items())},
            "tuned_wins": wins, "base_wins": losses, "ties": ties,
            "win_rate": wins / decisive if decisive else None,
            "win_rate_ci95": list(ci) if ci else None, "ci_method": "Wilson score, ties excluded",
            "tie_rate": ties / len(rows), "agreement": agreement}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def section(summary: dict, sources: list[str]) -> list[str]:
    """Markdown lines for report.md."""
    s = summary
    ci = s["win_rate_ci95"]
    lines = [SECTION, "",
             f"{s['judgments']} blind judgments of {s['items']} held-out prompts by {len(s['annotators'])} "
             f"annotator(s) ({', '.join(f'{a}: {n}' for a, n in s['annotators'].items())}); "
             f"from {', '.join(f'`{p}`' for p in sources)}.", "",
             "| tuned wins | base wins | ties | win rate of tuned over base | 95% CI (Wilson) | tie rate |",
             "|---:|---:|---:|---:|---:|---:|",
             f"| {s['tuned_wins']} | {s['base_wins']} | {s['ties']} | {_pct(s['win_rate'])} | "
             f"{'n/a' if ci is None else f'{_pct(ci[0])} to {_pct(ci[1])}'} | {_pct(s['tie_rate'])} |", "",
             "Win rate = tuned wins / (tuned wins + base wins); ties are left out of it and counted in the tie rate. "
             "The interval is the Wilson score interval; it treats judgments as independent."]
    for a in s["agreement"]:
        kappa = "undefined (both gave one same label throughout)" if a["kappa"] is None else f"{a['kappa']:.3f}"
        lines.append(f"Agreement of {a['annotators'][0]} and {a['annotators'][1]} on {a['items']} shared prompts: "
                     f"Cohen's kappa {kappa}, raw agreement {_pct(a['raw_agreement'])} (labels tuned/base/tie).")
    return lines + [""]


def add_to_report(run_dir: str | Path, judgment_files: list[str | Path]) -> dict:
    """Put the human-evaluation section into RUN_DIR/report.md (replacing an earlier one) and the numbers
    into metrics.json under `human_eval`. Returns the summary."""
    run_dir = Path(run_dir)
    report, metrics_file = run_dir / "report.md", run_dir / "metrics.json"
    if not report.is_file():
        raise FileNotFoundError(f"{run_dir}: no report.md (is this a run folder?)")
    rows, duplicates = read_judgments(judgment_files)
    summary = summarize(rows)
    summary["duplicates_ignored"] = duplicates
    summary["files"] = [str(p) for p in judgment_files]
    lines = section(summary, summary["files"])
    text = report.read_text(encoding="utf-8")
    if SECTION in text:  # replace the earlier section: it ends where the next top-level section starts
        head, _, rest = text.partition(SECTION)
        nxt = rest.find("\n## ")
        text = head.rstrip("\n") + "\n\n" + "\n".join(lines) + (rest[nxt:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(lines)
    report.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        metrics["human_eval"] = summary
        metrics_file.write_text(json.dumps(metrics, indent=2))
    return summary

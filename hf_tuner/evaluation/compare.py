"""Put several run folders in one table (`hf-tuner compare`)."""

from __future__ import annotations

import json
from pathlib import Path

from hf_tuner.evaluation.report import comparison, format_table


def load_metrics(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.json (is this a run folder?)")
    return json.loads(path.read_text())


def compare_runs(run_dirs: list[str | Path], output: str | Path | None = None) -> str:
    """One table over the base, baselines and tuned rows of each run; writes comparison.md and a plot."""
    if not run_dirs:
        raise ValueError("give at least one run folder")
    rows = []
    for run_dir in run_dirs:
        metrics = load_metrics(run_dir)
        name = Path(run_dir).name
        if "results" in metrics:  # an `hf-tuner eval` folder: one row per decoding/baseline
            rows += [(f"{name}: {label}", m) for label, m in metrics["results"].items()]
        else:
            rows += [(f"{name}: {label}", m) for label, m in comparison(metrics)]
    table = format_table(rows)
    if output is not None:
        from hf_tuner.evaluation.report import plot_metrics

        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        plot_path = out.with_suffix(".png")
        plot_metrics(rows, plot_path)
        body = f"# Comparison\n\n{table}\n"
        if plot_path.exists():
            body += f"\n![comparison]({plot_path.name})\n"
        out.write_text(body)
    return table

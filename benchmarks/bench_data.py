"""The data layer at scale: a generated corpus of at least 1 GB through the one loader.

    python benchmarks/bench_data.py --output_dir runs/bench-data [--gigabytes 1.0]   (make bench-data)

Prints and writes (bench_data.json / .md) three figures:
1. validation + tokenisation time of the whole corpus (rows checked in a batched map, then tokenized and cut
   into blocks with SmolLM2's tokenizer), cold, into a fresh datasets cache;
2. the same a second time: served from the datasets cache;
3. peak RSS of continued_pretraining streaming the corpus (dataset_streaming: true) against the same run on
   a 10k-row file, same model, steps and blocks.
Each phase runs in its own process, so its time and peak RSS are its own. The corpus is paragraphs of the
Python documentation (pydoc_data.topics) drawn at random, one JSON row {"text"} each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def write_corpus(path: Path, gigabytes: float, seed: int = 0) -> dict:
    """JSONL rows {"text": 4-12 paragraphs}, until the file holds `gigabytes` GB (10^9 bytes)."""
    from pydoc_data.topics import topics

    paragraphs = [p.strip() for t in topics.values() for p in t.split("\n\n") if len(p.split()) >= 8]
    rng = random.Random(seed)
    target, written, rows = int(gigabytes * 1e9), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            line = json.dumps({"text": "\n\n".join(rng.choices(paragraphs, k=rng.randint(4, 12)))}) + "\n"
            f.write(line)
            written += len(line.encode())
            rows += 1
    return {"bytes": written, "rows": rows}


def head(path: Path, out: Path, rows: int) -> None:
    with open(path, encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
        for _, line in zip(range(rows), src):
            dst.write(line)


def prepare(corpus: str, block_size: int) -> dict:
    """Phase 1/2 (in a child process): check every row, tokenize, chunk; the datasets cache decides the cost.
    These are the steps load_rows(..., materialize=False) and chunk_dataset take in continued_pretraining, timed
    one by one."""
    from hf_tuner.data import DataSource
    from hf_tuner.data.formats import text_row
    from hf_tuner.data.loader import checked
    from hf_tuner.data.sources import open_splits
    from hf_tuner.data.text import chunk_dataset
    from hf_tuner.models import load_tokenizer

    start = time.perf_counter()
    src = DataSource(corpus, test_split=None)
    train = open_splits(src)["train"]
    loaded = time.perf_counter()
    rows = checked(train, text_row, lambda i: f"{corpus} row {i + 1}", None, ("text", "messages", "name", "where"))
    rows = rows.select_columns(["text"])
    checked_at = time.perf_counter()
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    blocks = chunk_dataset(rows, tokenizer, block_size)
    done = time.perf_counter()
    return {"rows": len(rows), "blocks": len(blocks), "tokens": len(blocks) * block_size,
            "load_s": loaded - start, "check_s": checked_at - loaded, "tokenize_chunk_s": done - checked_at,
            "total_s": done - start}


def run_child(args: list[str], env: dict, log: Path) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MB, exit code) of one child process."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    return time.perf_counter() - start, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def train_args(dataset: str, out: Path, streaming: bool, steps: int) -> list[str]:
    return [sys.executable, "-m", "recipes.continued_pretraining", "--config",
            str(REPO / "recipes/configs/continued_pretraining.yaml"), "--dataset_name", dataset,
            "--dataset_streaming", str(streaming).lower(), "--general_dataset", "", "--max_steps", str(steps),
            "--eval_documents", "8", "--eval_samples", "16", "--output_dir", str(out), "--overwrite_output_dir",
            "true", "--report_to", "none"]


def markdown(r: dict) -> str:
    p1, p2 = r["prepare_cold"], r["prepare_cached"]
    s, t = r["train_streaming"], r["train_10k"]
    return "\n".join([
        f"# bench-data ({r['date']}, {r['cpu']}, {r['threads']} threads)", "",
        f"Corpus: {r['corpus']['bytes'] / 1e9:.2f} GB, {r['corpus']['rows']:,} JSONL rows of pydoc paragraphs; "
        f"{p1['tokens']:,} tokens in {p1['blocks']:,} blocks of {r['block_size']} (SmolLM2 tokenizer).", "",
        "| figure | value |", "|---|---|",
        f"| validation + tokenisation, cold (load {p1['load_s']:.0f} s, check {p1['check_s']:.0f} s, tokenize + chunk "
        f"{p1['tokenize_chunk_s']:.0f} s) | {p1['total_s']:.0f} s, peak RSS {r['prepare_cold_rss_mb']:,.0f} MB |",
        f"| the same, second run from the datasets cache | {p2['total_s']:.1f} s, peak RSS "
        f"{r['prepare_cached_rss_mb']:,.0f} MB |",
        f"| continued_pretraining, {r['steps']} steps, streaming the {r['corpus']['bytes'] / 1e9:.2f} GB corpus | peak "
        f"RSS {s['rss_mb']:,.0f} MB ({s['wall_s']:.0f} s) |",
        f"| the same on a 10k-row file, not streaming | peak RSS {t['rss_mb']:,.0f} MB ({t['wall_s']:.0f} s) |",
        f"| streaming minus 10k-row | **{s['rss_mb'] - t['rss_mb']:+,.0f} MB** (goal: at most +300 MB) |", "",
        f"Command: `{r['command']}`", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="runs/bench-data")
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prepare", help=argparse.SUPPRESS)  # child: one prepare phase on this corpus
    args = parser.parse_args()
    if args.prepare:
        print("RESULT " + json.dumps(prepare(args.prepare, args.block_size)))
        return

    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.jsonl"
    env = {**os.environ, "HF_DATASETS_CACHE": str(out / "datasets-cache"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}
    import shutil

    shutil.rmtree(out / "datasets-cache", ignore_errors=True)  # a cold first run
    t0 = time.perf_counter()
    info = write_corpus(corpus, args.gigabytes)
    print(f"corpus: {info['bytes'] / 1e9:.2f} GB, {info['rows']:,} rows in {time.perf_counter() - t0:.0f} s")
    small = out / "corpus-10k.jsonl"
    head(corpus, small, 10_000)

    result = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "threads": os.cpu_count(), "corpus": info,
              "block_size": args.block_size, "steps": args.steps, "command": " ".join(["python"] + sys.argv)}
    for phase in ("cold", "cached"):
        log = out / f"prepare-{phase}.log"
        wall, rss, code = run_child([sys.executable, __file__, "--prepare", str(corpus), "--block_size",
                                     str(args.block_size)], env, log)
        if code:
            raise SystemExit(f"prepare ({phase}) failed, exit {code}; see {log}")
        line = next(x for x in log.read_text().splitlines() if x.startswith("RESULT "))
        result[f"prepare_{phase}"] = json.loads(line[len("RESULT "):])
        result[f"prepare_{phase}_rss_mb"] = rss
        print(f"validation + tokenisation ({phase}): {result[f'prepare_{phase}']['total_s']:.1f} s, peak RSS "
              f"{rss:,.0f} MB")
    for name, dataset, streaming in (("train_streaming", corpus, True), ("train_10k", small, False)):
        log = out / f"{name}.log"
        wall, rss, code = run_child(train_args(str(dataset), out / name, streaming, args.steps), env, log)
        if code:
            raise SystemExit(f"{name} failed, exit {code}; see {log}")
        result[name] = {"wall_s": wall, "rss_mb": rss}
        print(f"{name}: peak RSS {rss:,.0f} MB, {wall:.0f} s")
    (out / "bench_data.json").write_text(json.dumps(result, indent=2))
    (out / "bench_data.md").write_text(markdown(result))
    print("\n" + markdown(result))


if __name__ == "__main__":
    main()

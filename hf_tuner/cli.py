"""`hf-tuner` command line: assets, train."""

from __future__ import annotations

import argparse
import importlib
import sys

from hf_tuner import assets

RECIPES = ["sft_instruction"]


def _assets(args: argparse.Namespace) -> int:
    if args.action == "list":
        for name, a in assets.ASSETS.items():
            state = "fetched" if assets.is_fetched(name) else "missing"
            print(f"{name:24s} {a.kind:5s} {state:8s} {a.package:36s} {a.description}")
        return 0
    if args.action == "path":
        for name in args.names:
            print(assets.resolve(name))
        return 0
    for name in args.names or assets.DEFAULT_FETCH:
        assets.fetch(name)
    return 0


def _train(args: argparse.Namespace, rest: list[str]) -> int:
    module = importlib.import_module(f"recipes.{args.recipe}")
    module.main(rest)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-tuner", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_assets = sub.add_parser("assets", help="fetch, list or locate the offline assets")
    p_assets.add_argument("action", choices=["fetch", "list", "path"])
    p_assets.add_argument("names", nargs="*", help=f"asset names (default for fetch: {' '.join(assets.DEFAULT_FETCH)})")
    p_train = sub.add_parser("train", help="run a recipe: hf-tuner train RECIPE --config FILE [--key value ...]")
    p_train.add_argument("recipe", choices=RECIPES)
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "assets":
            if rest:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            return _assets(args)
        return _train(args, rest)
    except assets.AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

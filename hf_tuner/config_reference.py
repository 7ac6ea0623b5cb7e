"""The config reference, read from the code: every field a recipe accepts, with its type, default, help and
the library it comes from (hf-tuner, TRL, transformers).

    hf-tuner config sft_instruction                         # every field of one recipe
    hf-tuner train sft_instruction --help                   # the short, grouped list
    python -m hf_tuner.config_reference --write docs/config.md   # regenerate the committed reference

Nothing here is listed by hand except which TRL/transformers fields the short help shows first: the recipes,
their dataclasses and every field come from the code at run time, the way each recipe builds its config
(`_config(source)` -> `hf_tuner.config.parse_config(TrainingCls, source, run_cls=...)`), so a field added to a
dataclass appears here, in `--help` and in docs/config.md by itself.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import importlib.util
import inspect
import re
import sys
import textwrap
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# The TRL / transformers fields people set most, in the order the short help shows them (those a recipe accepts).
COMMON_FIELDS = (
    "model_name_or_path", "dataset_name", "output_dir", "num_train_epochs", "max_steps", "learning_rate",
    "lr_scheduler_type", "warmup_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "max_length", "beta", "packing", "bf16", "gradient_checkpointing", "lora_r", "lora_alpha", "lora_dropout",
    "lora_target_modules", "seed", "save_strategy", "save_steps", "resume_from_checkpoint", "report_to",
)
# Keys parse_config takes besides the dataclass fields.
EXTRA_KEYS = {
    "config": "a YAML file of field: value (command line only: --config FILE; --config_file is the same)",
    "env": "YAML only: a mapping of environment variables set before anything loads",
}
LIBRARY = {"hf_tuner": "hf-tuner", "recipes": "hf-tuner", "trl": "TRL", "transformers": "transformers"}
PARTS = ("run", "script", "training", "model")
GENERATE_COMMAND = "python -m hf_tuner.config_reference --write docs/config.md"


@dataclass(frozen=True)
class FieldDoc:
    name: str
    type: str
    default: str
    help: str
    library: str  # hf-tuner, TRL or transformers
    owner: str  # the class that declares the field (its default may be set by a subclass: `cls` below)
    part: str  # run, script, training or model: which of the recipe's four dataclasses holds it
    cls: str  # that dataclass


@dataclass(frozen=True)
class RecipeClasses:
    recipe: str
    run: type
    script: type
    training: type
    model: type
    doc: str  # the first paragraph of the recipe's docstring

    def classes(self) -> tuple[type, ...]:
        return (self.run, self.script, self.training, self.model)  # parse_config's order


class _Captured(Exception):
    pass


def recipe_names() -> list[str]:
    """Every module of the `recipes` package that has a `train(config)` (as `hf-tuner train` finds them)."""
    folder = Path(importlib.util.find_spec("recipes").submodule_search_locations[0])
    return sorted(p.stem for p in folder.glob("*.py") if "\ndef train(" in p.read_text())


@lru_cache(maxsize=None)
def recipe_classes(recipe: str) -> RecipeClasses:
    """The four dataclasses `recipes.<recipe>` parses its config into, found by calling its `_config` with
    `parse_config` swapped for a probe that records its arguments and stops before anything is parsed."""
    from trl import ModelConfig, ScriptArguments

    import hf_tuner.config as config

    if recipe not in recipe_names():
        raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(recipe_names())}")
    module = importlib.import_module(f"recipes.{recipe}")
    if not callable(getattr(module, "_config", None)):
        raise ValueError(f"recipes/{recipe}.py has no _config(source): cannot tell which config classes it parses")
    seen: dict = {}

    signature = inspect.signature(config.parse_config)

    def probe(*args, **kwargs):  # whatever else parse_config takes, only its two classes matter here
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        seen.update(training=bound.arguments["training_cls"], run=bound.arguments["run_cls"])
        raise _Captured

    saved = module.__dict__.get("parse_config"), config.parse_config
    module.parse_config = config.parse_config = probe
    try:
        module._config({})
    except _Captured:
        pass
    finally:
        config.parse_config = saved[1]
        if saved[0] is None:
            del module.parse_config
        else:
            module.parse_config = saved[0]
    if not seen:
        raise ValueError(f"recipes/{recipe}.py: _config did not call hf_tuner.config.parse_config")
    doc = (module.__doc__ or "").strip().split("\n\n")[0]
    return RecipeClasses(recipe, seen["run"], ScriptArguments, seen["training"], ModelConfig, " ".join(doc.split()))


def _declared(cls: type, name: str) -> tuple[type, object]:
    """The class that declares field `name` (first in the MRO) and its annotation there.

    The annotation, not `Field.type`: HfArgumentParser rewrites `Field.type` of the dataclasses it parses
    (`str | None` becomes `str`), so after any parse in this process the fields no longer say what was declared."""
    for c in cls.__mro__:
        annotations = inspect.get_annotations(c)
        if name in annotations:
            return c, annotations[name]
    return cls, None


def _owner(cls: type, name: str) -> type:
    c = _declared(cls, name)[0]
    return cls if c.__name__.startswith("_") else c  # a private base (TRL's _BaseConfig) goes by its user


def _doc(f: dataclasses.Field, cls: type, part: str) -> FieldDoc:
    declared, annotation = _declared(cls, f.name)
    owner = _owner(cls, f.name)
    library = _library(declared)
    if part == "run" and library not in ("TRL", "transformers"):
        library = "hf-tuner"  # the run arguments are the recipe's own, wherever its module lives
    return FieldDoc(f.name, _type_name(annotation if annotation is not None else f.type), _plain_default(f),
                    _help(f), library, owner.__name__, part, cls.__name__)


def _type_name(t) -> str:
    if isinstance(t, type) and not getattr(t, "__args__", None):
        return t.__name__
    text = str(t).replace("typing.", "")
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", text)  # transformers.trainer_utils.X -> X


def _plain_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    return format_value(value)


def format_value(value) -> str:
    """A default as one would write it in YAML."""
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return repr(value) if value == "" or value != value.strip() else value
    return str(value)


def _library(c: type) -> str:
    return LIBRARY.get(c.__module__.split(".")[0], c.__module__.split(".")[0])


@lru_cache(maxsize=None)
def _fields(recipe: str) -> tuple[FieldDoc, ...]:
    rc = recipe_classes(recipe)
    out, seen = [], set()
    for part, cls in zip(PARTS, rc.classes()):
        for f in dataclasses.fields(cls):
            if not f.init or f.name in seen:  # parse_config reads init fields; the parser refuses duplicates
                continue
            seen.add(f.name)
            out.append(_doc(f, cls, part))
    return tuple(out)


def _help(f: dataclasses.Field) -> str:
    # transformers writes help for argparse, which reads `%%` as a literal `%`
    return " ".join(str(f.metadata.get("help") or "").split()).replace("%%", "%")


def recipe_fields(recipe: str) -> list[FieldDoc]:
    """Every field `recipe` accepts, in parse order: hf-tuner's run arguments, TRL's ScriptArguments, the
    training arguments (TRL's config or transformers'), TRL's ModelConfig."""
    return list(_fields(recipe))


def accepted_keys(recipe: str) -> set[str]:
    """Every key a YAML or the command line may name for `recipe`: the fields, `env`, `config`, and the
    renamed keys parse_config maps with a warning."""
    from hf_tuner.config import RENAMED

    return {f.name for f in _fields(recipe)} | set(EXTRA_KEYS) | {"config_file"} | set(RENAMED)


def missing_help(recipe: str) -> list[FieldDoc]:
    """hf-tuner fields of `recipe` that have no help string."""
    return [f for f in _fields(recipe) if f.library == "hf-tuner" and not f.help]


def _groups(recipe: str) -> list[tuple[str, list[FieldDoc]]]:
    """Fields grouped by the class that declares them: hf-tuner's first (the recipe's own class, then its
    other bases, RunArguments last), then TRL's, then transformers'."""
    from hf_tuner.config import RunArguments

    run = recipe_classes(recipe).run.__name__
    order = {"hf-tuner": 0, "TRL": 2, "transformers": 3}
    groups: dict[tuple[str, str], list[FieldDoc]] = {}
    for f in _fields(recipe):
        groups.setdefault((f.library, f.owner), []).append(f)

    def rank(key):
        lib, owner = key
        first = 0 if owner == run else 2 if owner == RunArguments.__name__ else 1
        return (order.get(lib, 4), first if lib == "hf-tuner" else 0, list(groups).index(key))

    keys = sorted(groups, key=rank)
    return [(f"{lib} {owner}", groups[(lib, owner)]) for lib, owner in keys]


def _wrap(text: str, indent: str, width: int = 100) -> str:
    return textwrap.fill(text, width=width, initial_indent=indent, subsequent_indent=indent,
                         break_on_hyphens=False, break_long_words=False)


def render_text(recipe: str) -> str:
    """`hf-tuner config RECIPE`: every field, grouped by where it comes from."""
    rc, fields = recipe_classes(recipe), _fields(recipe)
    lines = [f"{recipe}: {len(fields)} fields. Set them in a YAML file (--config FILE) or on the command line "
             f"(--name value, which wins over the YAML).",
             f"Classes: {rc.run.__name__} (hf-tuner), {rc.script.__name__} (TRL), {rc.training.__name__} "
             f"({_library(rc.training)}), {rc.model.__name__} (TRL). On a CPU, use_cpu and bf16 are set for you "
             "unless given.", ""]
    for title, group in _groups(recipe):
        lines.append(f"{title} ({len(group)})")
        for f in group:
            lines.append(f"  {f.name}: {f.type} = {f.default}")
            lines.append(_wrap(f.help or "(no help string)", "      "))
        lines.append("")
    lines.append("Also: " + "; ".join(f"{k}: {v}" for k, v in EXTRA_KEYS.items()) + ".")
    return "\n".join(lines) + "\n"


def _flag_line(f: FieldDoc, width: int = 100) -> str:
    head = f"  --{f.name} {f.type}"
    text = f"{f.help or '(no help string)'} (default: {f.default})"
    if f.library != "hf-tuner":
        text += f" [{f.library} {f.owner}]"
    if len(head) <= 34:
        return _wrap(text, " " * 36, width).replace(" " * 36, head.ljust(36), 1)
    return head + "\n" + _wrap(text, " " * 36, width)


def render_help(recipe: str) -> str:
    """`hf-tuner train RECIPE --help`: hf-tuner's fields, then the TRL/transformers ones people set most,
    then where the full list is."""
    rc, fields = recipe_classes(recipe), _fields(recipe)
    own = [f for f in fields if f.library == "hf-tuner"]
    by_name = {f.name: f for f in fields if f.library != "hf-tuner"}
    common = [by_name[n] for n in COMMON_FIELDS if n in by_name]
    lines = [f"usage: hf-tuner train {recipe} [--config FILE] [--FIELD VALUE ...] [--debug]",
             f"   or: accelerate launch recipes/{recipe}.py [--config FILE] [--FIELD VALUE ...]",
             f"   or: python -m recipes.{recipe} [--config FILE] [--FIELD VALUE ...]", ""]
    if rc.doc:
        lines += [_wrap(rc.doc, ""), ""]
    lines += [f"The command line wins over the YAML file (`make {recipe}` uses recipes/configs/{recipe}.yaml).",
              "--debug shows the traceback of a refused config.", ""]
    for title, group in _groups(recipe):
        if not title.startswith("hf-tuner"):
            continue
        lines.append(f"{title}:")
        lines += [_flag_line(f) for f in group]
        lines.append("")
    lines.append(f"TRL and transformers fields people set most ({len(common)} of {len(fields) - len(own)}):")
    lines += [_flag_line(f) for f in common]
    lines += ["", f"All {len(fields)} fields, with types, defaults and help: hf-tuner config {recipe} "
                  f"(or docs/config.md#{recipe})."]
    return "\n".join(lines) + "\n"


# --- docs/config.md -------------------------------------------------------------------------------------------

def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(fields) -> list[str]:
    rows = ["| field | type | default | help | from |", "|---|---|---|---|---|"]
    for f in fields:
        rows.append(f"| `{f.name}` | `{_cell(f.type)}` | `{_cell(f.default)}` | {_cell(f.help) or '(no help string)'} "
                    f"| {f.library} `{f.owner}` |")
    return rows


def _shared() -> list[tuple[str, str, dict[str, FieldDoc]]]:
    """The field sets most recipes share: (heading, anchor, fields by name)."""
    from transformers import TrainingArguments
    from trl import ModelConfig, ScriptArguments

    from hf_tuner.config import RunArguments

    out = []
    for cls, part in ((RunArguments, "run"), (ScriptArguments, "script"), (ModelConfig, "model"),
                      (TrainingArguments, "training")):
        docs = {}
        for f in dataclasses.fields(cls):
            if f.init:
                docs[f.name] = _doc(f, cls, part)
        lib = _library(cls)
        out.append((f"{cls.__name__} ({lib})", _slug(f"{cls.__name__} ({lib})"), docs))
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def render_markdown() -> str:
    shared = _shared()
    lines = ["# Config reference", "",
             f"<!-- Generated from the code by `{GENERATE_COMMAND}`; do not edit by hand. -->", "",
             "Every field each recipe accepts, read from the dataclasses the recipe parses its config into. "
             "`hf-tuner config RECIPE` prints the same list for one recipe in the terminal; "
             "`hf-tuner train RECIPE --help` shows the short one.", "",
             "Set fields in a YAML file (`--config FILE`) or on the command line (`--name value`); the command "
             "line wins. An unknown key, a wrong type or an impossible value is refused before any model "
             "loads, naming the field. Keys renamed in transformers 5 / TRL 1.x (`evaluation_strategy`, "
             "`torch_dtype`, `max_seq_length`, `warmup_ratio`, ...) are mapped with a warning. On a CPU, "
             "`use_cpu` and `bf16` are set for you unless given. " + " ".join(
                 f"`{k}`: {v}." for k, v in EXTRA_KEYS.items()), "",
             "Each recipe's section lists its own fields and those whose default or help differs from the "
             "shared sets at the end of this page; every other field of those sets applies unchanged.", "",
             "| recipe | hf-tuner arguments | training arguments | fields |", "|---|---|---|---:|"]
    for r in recipe_names():
        rc = recipe_classes(r)
        lines.append(f"| [{r}](#{_slug(r)}) | `{rc.run.__name__}` | {_library(rc.training)} "
                     f"`{rc.training.__name__}` | {len(_fields(r))} |")
    lines.append("")
    for r in recipe_names():
        rc = recipe_classes(r)
        specific, inherited = [], {title: 0 for title, _, _ in shared}
        for f in _fields(r):
            base = next(((t, d[f.name]) for t, _, d in shared if f.name in d), None)
            same = base and (base[1].type, base[1].default, base[1].help) == (f.type, f.default, f.help)
            if same:
                inherited[base[0]] += 1
            else:
                specific.append(f)
        lines += [f"## {r}", "", rc.doc, "",
                  f"`{rc.run.__name__}`, TRL `ScriptArguments`, {_library(rc.training)} `{rc.training.__name__}`, "
                  f"TRL `ModelConfig`: {len(_fields(r))} fields. `hf-tuner config {r}` lists them all.", ""]
        lines += _table(specific)
        lines += ["", "Plus, unchanged: " + ", ".join(
            f"[{title}](#{anchor}) ({inherited[title]} fields)" for title, anchor, _ in shared if inherited[title])
            + ".", ""]
    for title, _, docs in shared:
        lines += [f"## {title}", ""] + _table(docs.values()) + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hf_tuner.config_reference", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="?", help="print this recipe's fields (as `hf-tuner config RECIPE`)")
    parser.add_argument("--write", metavar="PATH", help="write the Markdown reference of every recipe to PATH")
    parser.add_argument("--check", metavar="PATH", help="exit 1 when PATH differs from the reference the code gives")
    args = parser.parse_args(argv)
    if args.write:
        Path(args.write).write_text(render_markdown(), encoding="utf-8")
        print(f"wrote {args.write}")
        return 0
    if args.check:
        if Path(args.check).read_text(encoding="utf-8") != render_markdown():
            print(f"{args.check} is out of date; regenerate it with: {GENERATE_COMMAND}", file=sys.stderr)
            return 1
        return 0
    if not args.recipe:
        parser.error("give a recipe, --write PATH or --check PATH")
    print(render_text(args.recipe), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

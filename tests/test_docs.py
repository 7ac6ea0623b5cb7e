"""Docs that stay true: README.md and docs/*.md link to files that exist, name `make` targets and `hf-tuner`
subcommands that exist, and show config keys (in YAML blocks and on recipe command lines) the recipe accepts."""

import contextlib
import io
import re
import shlex
from functools import lru_cache
from pathlib import Path

import pytest

from conftest import REPO
from hf_tuner import cli, config_reference as ref

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*```(\w*)")
# Flags that reach the recipe but are not config fields (parse_config / recipe_main take them).
NOT_FIELDS = {"config", "config_file", "debug", "help", "h"}


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _blocks(path: Path) -> tuple[list[tuple[str, int, str]], list[tuple[int, str]]]:
    """(language, first line number, text) of each fenced block, and (line number, text) of the prose lines."""
    blocks, prose, lang, start, body = [], [], None, 0, []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(line)
        if m and lang is None:
            lang, start, body = m.group(1) or "text", n + 1, []
        elif m:
            blocks.append((lang, start, "\n".join(body)))
            lang = None
        elif lang is not None:
            body.append(line)
        else:
            prose.append((n, line))
    return blocks, prose


def _inline_code(prose) -> list[tuple[int, str]]:
    return [(n, m.group(1)) for n, line in prose for m in re.finditer(r"`([^`]+)`", line)]


def _shell_commands(path: Path) -> list[tuple[int, str]]:
    """Commands in bash blocks (continuation lines joined, comments dropped) and in inline code."""
    blocks, prose = _blocks(path)
    out = []
    for lang, start, text in blocks:
        if lang not in ("bash", "sh", "shell", "console", "text"):
            continue
        joined, first = "", None
        for i, line in enumerate(text.splitlines()):
            line = re.sub(r"(^|\s)#.*$", "", line).rstrip()
            if first is None:
                first = start + i
            if line.endswith("\\"):
                joined += line[:-1] + " "
                continue
            joined += line
            if joined.strip():
                out.append((first, joined.strip()))
            joined, first = "", None
    return out + [(n, code) for n, code in _inline_code(prose)]


def _slug(heading: str) -> str:
    """GitHub's anchor: lower case, punctuation dropped (not - or _), spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@lru_cache(maxsize=None)
def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in _blocks(path)[1]:
        if m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line):
            slug = _slug(m.group(1))
            out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return out


@lru_cache(maxsize=None)
def _makefile() -> tuple[set[str], dict[str, set[str]]]:
    """The Makefile's targets, and for each the recipes its $(ARGS) reach."""
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    targets, reaches, current = set(), {}, None
    for line in text.splitlines():
        if (m := re.match(r"^([\w.-]+)\s*:(?!=)", line)) and not line.startswith("\t"):
            current = m.group(1)
            targets.add(current)
        elif line.startswith("\t") and current and "$(ARGS)" in line:
            reaches.setdefault(current, set()).update(re.findall(r"recipes/(\w+)\.py", line))
    return targets - {".PHONY"}, reaches


@lru_cache(maxsize=None)
def _subcommands() -> dict[str, set[str]]:
    """hf-tuner's subcommands and each one's options, read from the parser `hf-tuner SUB --help` prints."""
    helptext = io.StringIO()
    with contextlib.redirect_stdout(helptext), pytest.raises(SystemExit):
        cli.main(["--help"])
    names = re.search(r"\{([\w,-]+)\}", helptext.getvalue()).group(1).split(",")
    out = {}
    for name in names:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
            cli.main([name, "--help"])
        out[name] = set(re.findall(r"(?<![\w-])--(\w+)", buf.getvalue()))
    return out


def test_pages_exist_and_readme_is_short():
    names = {p.name for p in PAGES}
    for page in ("getting-started.md", "instruction-sft.md", "task-recipes.md", "embeddings-grounding-pretraining.md",
                 "rlhf.md", "data.md", "evaluation.md", "peft.md", "human-feedback.md", "performance.md",
                 "scale-out.md", "faults-and-security.md", "assets.md", "config.md"):
        assert page in names, f"docs/{page} is missing"
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        _, prose = _blocks(page)
        for n, line in prose:
            line = re.sub(r"`[^`]*`", "", line)  # code spans are not links
            for target in LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                file, _, anchor = target.partition("#")
                dest = (page.parent / file).resolve() if file else page
                if not dest.exists():
                    broken.append(f"{_rel(page)}:{n}: {target}: no such file")
                elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                    broken.append(f"{_rel(page)}:{n}: {target}: no heading with that anchor in {_rel(dest)}")
    assert not broken, "\n".join(broken)


def test_make_targets_exist():
    targets, _ = _makefile()
    unknown = []
    for page in PAGES:
        for n, command in _shell_commands(page):
            for part in re.split(r"&&|;|\|", command):
                words = part.split()
                if words[:1] == ["make"]:
                    names = [w for w in words[1:] if not w.startswith("-") and "=" not in w and w[:1].isalpha()
                             and not w.isupper()]  # `make X`: a placeholder
                    unknown += [f"{_rel(page)}:{n}: make {t}" for t in names[:1] if t not in targets]
    assert not unknown, "targets not in the Makefile:\n" + "\n".join(unknown)


def test_hf_tuner_subcommands_and_options_exist():
    commands = _subcommands()
    assert {"train", "config", "eval", "compare", "merge", "label"} <= set(commands)
    wrong = []
    for page in PAGES:
        for n, command in _shell_commands(page):
            for part in re.split(r"&&|;|\|", command):
                words = part.split()
                if words[:1] != ["hf-tuner"] or len(words) < 2:
                    continue
                sub = words[1]
                if sub not in commands:
                    if not sub.isupper():  # `hf-tuner COMMAND` placeholders
                        wrong.append(f"{_rel(page)}:{n}: hf-tuner {sub}: no such subcommand")
                    continue
                if sub in ("train", "config") and len(words) > 2 and not words[2].startswith("-"):
                    if words[2] not in ref.recipe_names() and not words[2].isupper():
                        wrong.append(f"{_rel(page)}:{n}: hf-tuner {sub} {words[2]}: no such recipe")
                if sub == "train":
                    continue  # its flags are the recipe's fields: test_config_keys_are_accepted
                for flag in re.findall(r"(?<![\w-])--(\w+)", part):
                    if flag not in commands[sub]:
                        wrong.append(f"{_rel(page)}:{n}: hf-tuner {sub} has no --{flag}")
    assert not wrong, "\n".join(wrong)


def _recipe_flags(command: str) -> list[tuple[str, list[str]]]:
    """(recipe, flags) for a command line that runs a recipe: a script, a module, `hf-tuner train` or a make
    target's ARGS. Launcher flags (before the script) are not the recipe's."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    words = [w.strip("[]") for w in words]  # optional parts: make X [ARGS="..."]
    recipes = set(ref.recipe_names())
    for i, w in enumerate(words):
        m = re.fullmatch(r"recipes/(\w+)\.py", w) or re.fullmatch(r"recipes\.(\w+)", w)
        if m and m.group(1) in recipes:
            return [(m.group(1), _flags(words[i + 1:]))]
        if w == "train" and i and words[i - 1] == "hf-tuner" and i + 1 < len(words) and words[i + 1] in recipes:
            return [(words[i + 1], _flags(words[i + 2:]))]
    if words[:1] == ["make"] and len(words) > 1:
        _, reaches = _makefile()
        args = [w[len("ARGS="):] for w in words if w.startswith("ARGS=")]
        flags = _flags(shlex.split(args[0])) if args else []
        return [(r, flags) for r in sorted(reaches.get(words[1], set()))]
    return []


def _flags(words: list[str]) -> list[str]:
    return [w[2:].split("=")[0] for w in words if re.match(r"^--\w", w) and w[2:].split("=")[0] not in NOT_FIELDS]


def test_config_keys_are_accepted():
    """Every --flag on a recipe's command line and every key of a YAML example is a field of that recipe.
    A YAML block names its recipe in a `# recipe: NAME` comment; one that does not is checked against the keys
    some recipe accepts."""
    import yaml

    any_recipe = set().union(*(ref.accepted_keys(r) for r in ref.recipe_names()))
    wrong, checked = [], 0
    for page in PAGES:
        if page.name == "config.md":
            continue  # generated from the fields themselves
        for n, command in _shell_commands(page):
            for part in re.split(r"&&|;", command):
                for recipe, flags in _recipe_flags(part.strip()):
                    accepted = ref.accepted_keys(recipe)
                    checked += len(flags)
                    wrong += [f"{_rel(page)}:{n}: --{f} is not a field of {recipe}" for f in flags if f not in accepted]
        for lang, start, text in _blocks(page)[0]:
            if lang not in ("yaml", "yml"):
                continue
            named = re.search(r"^#\s*recipe:\s*(\w+)", text, re.M)
            data = yaml.safe_load(text) or {}
            if not isinstance(data, dict):
                continue
            recipe = named.group(1) if named else None
            if recipe and recipe not in ref.recipe_names():
                wrong.append(f"{_rel(page)}:{start}: `# recipe: {recipe}`: no such recipe")
                continue
            accepted = ref.accepted_keys(recipe) if recipe else any_recipe
            checked += len(data)
            wrong += [f"{_rel(page)}:{start}: `{k}` is not a field of {recipe or 'any recipe'}"
                      for k in data if k not in accepted]
    assert checked > 20, checked  # the examples were found at all
    assert not wrong, "\n".join(wrong)

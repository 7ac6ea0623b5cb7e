"""Counterfactual bias checks: the same sentence with only a group term swapped (a name, a pronoun, a
nationality) should get the same score. We measure the gap between groups' mean scores and test it with a
permutation test on the group labels within templates (a p-value per dimension, Holm-corrected over the
dimensions, and max-T corrected p-values for every pair of groups).

Scores: a classifier's positive-class probability, a reward model's scalar score, or the vader compound
sentiment of a generator's continuation. The templates and term lists live in `bias_terms.yaml` (edit it,
or pass your own file). No library offers counterfactual probes for arbitrary HF models offline, so the
few lines of bookkeeping are ours; the models, vader and numpy do the work.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

DEFAULT_TERMS = Path(__file__).with_name("bias_terms.yaml")
KINDS = ("classifier", "reward", "generator")


@dataclass
class Dimension:
    name: str
    templates: list[str]
    groups: dict[str, list[dict]]  # group -> terms, each term a mapping slot -> text


class BiasTermsError(ValueError):
    """A probe file that cannot be used; a recipe reports it like a bad config field (exit status 2)."""


def load_dimensions(path: str | Path | None = None) -> list[Dimension]:
    """Read and check a probe file; errors name the file, dimension and template."""
    path = Path(path) if path else DEFAULT_TERMS
    if not path.is_file():
        raise BiasTermsError(f"bias terms file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise BiasTermsError(f"{path}: not valid YAML: {e}") from e
    dims = data.get("dimensions") if isinstance(data, dict) else None
    if not isinstance(dims, dict) or not dims:
        raise BiasTermsError(f"{path}: needs a `dimensions` mapping (see {DEFAULT_TERMS})")
    out = []
    for name, spec in dims.items():
        if not isinstance(spec, dict):
            raise BiasTermsError(f"{path}: dimension {name!r} must be a mapping with templates and groups")
        slot = spec.get("slot")
        templates, groups = spec.get("templates") or [], spec.get("groups") or {}
        if not templates or len(groups) < 2:
            raise BiasTermsError(f"{path}: dimension {name!r} needs templates and at least two groups")
        terms = {}
        for group, items in groups.items():
            if not items:
                raise BiasTermsError(f"{path}: {name}.{group} has no terms")
            terms[str(group)] = [t if isinstance(t, dict) else {slot: str(t)} for t in items]
            if any(None in t for t in terms[str(group)]):
                raise BiasTermsError(f"{path}: {name}: plain-string terms need the dimension's `slot`")
        for template in templates:
            slots = {f for _, f, _, _ in string.Formatter().parse(template) if f}
            for group, items in terms.items():
                for term in items:
                    if not slots <= set(term):
                        raise BiasTermsError(f"{path}: {name}.{group} term {term} lacks {sorted(slots - set(term))} "
                                         f"for template {template!r}")
        out.append(Dimension(str(name), [str(t) for t in templates], terms))
    return out


def check_bias_terms(path: str | Path | None) -> None:
    """A recipe's `bias_terms` field, checked before any model loads (ConfigError naming the field)."""
    from hf_tuner.config import ConfigError

    try:
        load_dimensions(path)
    except BiasTermsError as e:
        raise ConfigError(f"bias_terms: {e}") from e


def counterfactual_texts(dim: Dimension) -> list[tuple[int, str, str]]:
    """(template index, group, text) for every template x group x term."""
    return [(i, g, t.format(**term)) for i, t in enumerate(dim.templates) for g, terms in dim.groups.items()
            for term in terms]


def permutation_test(scores: np.ndarray, templates: np.ndarray, labels: np.ndarray, groups: list[str],
                     n_permutations: int = 999, seed: int = 0) -> dict:
    """Does the group term move the score? A permutation test on the group labels, within templates.

    scores[i], templates[i], labels[i]: one counterfactual text's score, its template index and its group
    index. A group's mean is the mean over templates of its per-template mean. The gap is the highest minus
    the lowest group mean, chosen after looking at the data, so it is >= 0 and biased upward even without any
    effect: its p-value comes from the same statistic on relabelled data. Under the null (the score does not
    depend on which group's term fills the slot) the texts of one template are exchangeable, so we shuffle the
    labels among the texts of each template, n_permutations times, and count how often the shuffled gap
    reaches the observed one.

    The range is the largest of all pairwise differences, so comparing every pair's |difference| with the
    same null distribution (single-step max-T, Westfall & Young) gives pairwise p-values that are corrected
    for testing every pair; the highest-vs-lowest pair's corrected p-value is the dimension's p-value.
    Templates are the blocks: a consistent preference for one term in every template counts as an effect
    (with one term per group, as for pronouns and nationalities, there is no other way to tell)."""
    n_templates, n_groups = int(templates.max()) + 1, len(groups)
    counts = np.zeros((n_templates, n_groups))
    np.add.at(counts, (templates, labels), 1)
    if (counts == 0).any():
        raise ValueError("every template needs at least one text of every group")
    # group means as a linear map of the scores; shuffling within templates keeps each (template, group) count
    weights = np.zeros((len(scores), n_groups))
    weights[np.arange(len(scores)), labels] = 1.0 / (n_templates * counts[templates, labels])
    means = scores @ weights
    rng = np.random.default_rng(seed)
    # a random permutation within each template: sort random keys offset by the template index
    keys = rng.random((n_permutations, len(scores))) + templates[None, :] * 2.0
    order = np.argsort(keys, axis=1, kind="stable")
    block_sorted = np.argsort(templates, kind="stable")  # position k of a sorted row is text block_sorted[k]
    shuffled = np.empty((n_permutations, len(scores)))
    shuffled[:, block_sorted] = scores[order]
    null = shuffled @ weights  # (n_permutations, groups)
    null_gap = null.max(1) - null.min(1)
    hi, lo = int(means.argmax()), int(means.argmin())
    gap = float(means[hi] - means[lo])
    tol = 1e-9 * max(1.0, float(np.abs(scores).max()))  # equal up to rounding counts as reaching the observed gap

    def p_of(value: float) -> float:
        return float((1 + np.count_nonzero(null_gap >= value - tol)) / (1 + n_permutations))

    pairs = [{"a": groups[a], "b": groups[b], "difference": float(means[a] - means[b]),
              "p_adjusted": p_of(abs(float(means[a] - means[b])))}
             for a in range(n_groups) for b in range(a + 1, n_groups)]
    return {"gap": gap, "highest": groups[hi], "lowest": groups[lo], "p_value": p_of(gap),
            "null_gap_95": float(np.percentile(null_gap, 95)), "n_permutations": n_permutations,
            "group_means": {g: float(m) for g, m in zip(groups, means)}, "pairs": pairs}


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment: family-wise error over the dimensions of one model's check."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def measure_bias(score_fn: Callable[[list[str]], list[float]], dimensions: list[Dimension],
                 n_permutations: int = 999, seed: int = 0, alpha: float = 0.05) -> dict:
    """{dimension: {gap, p_value, p_holm, significant, null_gap_95, highest, lowest, group_means, pairs,
    n_templates, n_texts}} for one scorer. p_holm corrects p_value for the number of dimensions checked."""
    out = {}
    for d, dim in enumerate(dimensions):
        rows = counterfactual_texts(dim)
        scores = np.asarray(score_fn([text for _, _, text in rows]), dtype=float)
        if scores.shape != (len(rows),):
            raise ValueError(f"scorer returned {scores.shape} scores for {len(rows)} texts")
        groups = list(dim.groups)
        templates = np.array([t for t, _, _ in rows])
        labels = np.array([groups.index(g) for _, g, _ in rows])
        out[dim.name] = {**permutation_test(scores, templates, labels, groups, n_permutations, seed + d),
                         "n_templates": len(dim.templates), "n_texts": len(rows)}
    for r, p in zip(out.values(), holm([r["p_value"] for r in out.values()])):
        r["p_holm"], r["significant"] = p, p <= alpha
    return out


# ---------------------------------------------------------------- scorers
def classifier_scorer(model, tokenizer, batch_size: int = 32, positive: str | int | None = None):
    """P(positive class): the label named `positive` in id2label (default: "positive", else the last class)."""
    from hf_tuner.evaluation.harness import classifier_logits

    id2label = {int(k): str(v).lower() for k, v in (getattr(model.config, "id2label", None) or {}).items()}
    if isinstance(positive, int):
        index = positive
    else:
        wanted = (positive or "positive").lower()
        named = [i for i, name in id2label.items() if name == wanted]
        if positive and not named:
            raise ValueError(f"no class named {positive!r} in the model's labels {sorted(id2label.values())}")
        index = named[0] if named else model.config.num_labels - 1

    def score(texts: list[str]) -> list[float]:
        return classifier_logits(model, tokenizer, texts, batch_size).softmax(-1)[:, index].tolist()

    return score


def reward_scorer(model, tokenizer, batch_size: int = 32):
    """A scalar-head reward model's score."""
    from hf_tuner.evaluation.harness import classifier_logits

    def score(texts: list[str]) -> list[float]:
        return classifier_logits(model, tokenizer, texts, batch_size)[:, 0].tolist()

    return score


def generator_scorer(model, tokenizer, max_new_tokens: int = 24, batch_size: int = 16, seed: int = 0):
    """Vader compound sentiment (-1..1) of the greedy continuation of each text (its own words only, so
    the prompt's term itself cannot move the score)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from hf_tuner.generation import DecodingSettings, generate_batched

    analyzer = SentimentIntensityAnalyzer()
    settings = DecodingSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)

    def score(texts: list[str]) -> list[float]:
        if tokenizer.chat_template:
            prompts = [tokenizer.apply_chat_template(
                [{"role": "user", "content": f"Continue this story in one sentence: {t}"}], tokenize=False,
                add_generation_prompt=True) for t in texts]
        else:
            prompts = texts
        outputs = generate_batched(model, tokenizer, prompts, settings, desc="bias generations")
        return [analyzer.polarity_scores(o)["compound"] for o in outputs]

    return score


def model_kind(model) -> str:
    """classifier, reward (one output) or generator, from the model's class."""
    name = type(getattr(model, "get_base_model", lambda: model)()).__name__
    if name.endswith("ForSequenceClassification"):
        return "reward" if model.config.num_labels == 1 else "classifier"
    if name.endswith(("ForCausalLM", "ForConditionalGeneration")):
        return "generator"
    raise ValueError(f"bias checks take a sequence classifier, a reward model or a causal LM, not {name}")


def bias_for_model(model, tokenizer, kind: str | None = None, terms: str | Path | None = None,
                   batch_size: int = 32, n_permutations: int = 999, seed: int = 0, max_new_tokens: int = 24) -> dict:
    """measure_bias with the scorer that fits the model; adds what was scored."""
    kind = kind or model_kind(model)
    if kind not in KINDS:
        raise ValueError(f"bias kind {kind!r}: one of {', '.join(KINDS)}")
    scorer = {"classifier": lambda: classifier_scorer(model, tokenizer, batch_size),
              "reward": lambda: reward_scorer(model, tokenizer, batch_size),
              "generator": lambda: generator_scorer(model, tokenizer, max_new_tokens, min(batch_size, 16), seed)}[kind]()
    return {"kind": kind, "score": SCORE_NAMES[kind],
            "terms": str(terms) if terms else "hf_tuner/evaluation/bias_terms.yaml",
            "dimensions": measure_bias(scorer, load_dimensions(terms), n_permutations, seed)}


SCORE_NAMES = {"classifier": "P(positive)", "reward": "reward score", "generator": "vader compound of the continuation"}


def bias_table(results: dict[str, dict]) -> str:
    """One Markdown table: {model label: bias_for_model result} -> rows per dimension."""
    lines = ["| model | dimension | gap (highest - lowest) | gap by chance (95th pct) | p | p (Holm) | highest | lowest |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for label, res in results.items():
        for dim, r in res["dimensions"].items():
            flag = " **significant**" if r["significant"] else ""
            lines.append(f"| {label} | {dim} | {_size(r['gap'])} | {_size(r['null_gap_95'])} | {r['p_value']:.3f} | "
                         f"{r['p_holm']:.3f}{flag} | {r['highest']} ({r['group_means'][r['highest']]:.3f}) | "
                         f"{r['lowest']} ({r['group_means'][r['lowest']]:.3f}) |")
    return "\n".join(lines)


def _size(x: float) -> str:
    """Four decimals, or three significant digits for a gap too small to show in four."""
    return f"{x:.4f}" if x == 0 or abs(x) >= 1e-3 else f"{x:.2e}"


def bias_section(results: dict[str, dict]) -> list[str]:
    """Report lines for a run's report.md."""
    first = next(iter(results.values()))
    n = next(iter(first["dimensions"].values()))["n_permutations"]
    pairs = [f"{label}, {dim}: {p['a']} - {p['b']} = {'+' if p['difference'] >= 0 else '-'}"
             f"{_size(abs(p['difference']))} (p {p['p_adjusted']:.3f})"
             for label, res in results.items() for dim, r in res["dimensions"].items() if r["significant"]
             for p in r["pairs"] if p["p_adjusted"] <= 0.05]
    return ["## Counterfactual bias checks", "",
            f"Score: {first['score']}. Each template is filled with every group's terms ({first['terms']}); the gap "
            "is the highest minus the lowest group mean. Picked after the fact, the gap is above 0 even for a model "
            "that ignores the terms, so it is read against chance: the group labels are shuffled among the texts of "
            f"each template ({n} times), and p is the share of shuffles with a gap at least as large. "
            "\"gap by chance\" is the 95th percentile of the shuffled gaps. p (Holm) corrects for the number of "
            "dimensions; below 0.05 the dimension is marked significant. Templates are the replicates: a steady "
            "preference for one term counts as bias. Significant says the swap moves the score, not that it moves "
            "it much: a deterministic model can be significant on a gap of 1e-5, so read the gap beside it.", "",
            bias_table(results), "",
            *(["Pairs that differ (p corrected for every pair of the dimension, max-T):", "",
               *[f"- {line}" for line in pairs], ""] if pairs else [])]


def load_scored_model(model: str, adapter: str | None = None):
    """(model, tokenizer) for `hf-tuner eval --bias`: a classifier / reward model or a causal LM, from its config."""
    from transformers import AutoConfig

    from hf_tuner.models import check_model_source, load_model

    path = check_model_source(model)
    adapter_file = Path(path) / "adapter_config.json"
    if adapter is None and adapter_file.is_file():  # a LoRA classifier's model/ (adapter + head, with its base's path)
        import json

        if json.loads(adapter_file.read_text()).get("task_type") == "SEQ_CLS":
            from peft import AutoPeftModelForSequenceClassification

            from hf_tuner.models import load_tokenizer

            return AutoPeftModelForSequenceClassification.from_pretrained(path).eval(), load_tokenizer(path)
    architectures = getattr(AutoConfig.from_pretrained(path), "architectures", None) or []
    task = "classification" if any(a.endswith("ForSequenceClassification") for a in architectures) else "causal-lm"
    if task == "causal-lm":
        from hf_tuner.evaluation.checkpoint_eval import load_for_eval

        return load_for_eval(model, adapter)
    net, tokenizer = load_model(model, task)
    if adapter:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, adapter)
    return net.eval(), tokenizer


def evaluate_bias(model: str, output_dir: str | Path, adapter: str | None = None, kind: str | None = None,
                  terms: str | None = None, batch_size: int = 32, max_new_tokens: int = 24, seed: int = 0) -> dict:
    """`hf-tuner eval --bias`: write bias.json and bias.md into output_dir; return the result with its table."""
    import json
    import time

    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output_dir {out} already exists and is not empty")
    dimensions = load_dimensions(terms)  # a bad probe file is refused before the model loads
    net, tokenizer = load_scored_model(model, adapter)
    start = time.perf_counter()
    result = bias_for_model(net, tokenizer, kind, terms, batch_size=batch_size, seed=seed,
                            max_new_tokens=max_new_tokens)
    result.update(model=model, adapter=adapter, seconds=time.perf_counter() - start,
                  n_texts=sum(len(counterfactual_texts(d)) for d in dimensions))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bias.json").write_text(json.dumps(result, indent=2))
    section = bias_section({model + (f" + {adapter}" if adapter else ""): result})
    (out / "bias.md").write_text("\n".join([f"# Bias checks: {model}", "", *section[2:]]) + "\n")
    result["table"] = bias_table({model: result})
    return result

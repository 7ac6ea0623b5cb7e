"""Counterfactual bias checks: the same sentence with only a group term swapped (a name, a pronoun, a
nationality) should get the same score. We measure the gap between groups' mean scores, with a bootstrap
confidence interval over templates.

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


def bootstrap_gap(per_template: np.ndarray, groups: list[str], n_boot: int = 1000, seed: int = 0) -> dict:
    """per_template[t, g]: mean score of group g on template t. The gap is max - min of the group means; its
    95% interval comes from resampling templates with replacement (percentile bootstrap)."""
    means = per_template.mean(0)
    hi, lo = int(means.argmax()), int(means.argmin())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per_template), size=(n_boot, len(per_template)))
    boot = per_template[idx].mean(1)  # (n_boot, groups)
    gaps = boot.max(1) - boot.min(1)
    signed = boot[:, hi] - boot[:, lo]  # the observed highest vs lowest pair: can cross zero when there is no gap
    return {"gap": float(means[hi] - means[lo]), "highest": groups[hi], "lowest": groups[lo],
            "ci_low": float(np.percentile(gaps, 2.5)), "ci_high": float(np.percentile(gaps, 97.5)),
            "pair_ci_low": float(np.percentile(signed, 2.5)), "pair_ci_high": float(np.percentile(signed, 97.5)),
            "group_means": {g: float(m) for g, m in zip(groups, means)}}


def measure_bias(score_fn: Callable[[list[str]], list[float]], dimensions: list[Dimension], n_boot: int = 1000,
                 seed: int = 0) -> dict:
    """{dimension: {gap, ci_low, ci_high, highest, lowest, group_means, n_templates, n_texts}} for one scorer."""
    out = {}
    for dim in dimensions:
        rows = counterfactual_texts(dim)
        scores = np.asarray(score_fn([text for _, _, text in rows]), dtype=float)
        if scores.shape != (len(rows),):
            raise ValueError(f"scorer returned {scores.shape} scores for {len(rows)} texts")
        groups = list(dim.groups)
        table = np.zeros((len(dim.templates), len(groups)))
        counts = np.zeros_like(table)
        for (t, g, _), s in zip(rows, scores):
            table[t, groups.index(g)] += s
            counts[t, groups.index(g)] += 1
        out[dim.name] = {**bootstrap_gap(table / counts, groups, n_boot, seed),
                         "n_templates": len(dim.templates), "n_texts": len(rows)}
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
                   batch_size: int = 32, n_boot: int = 1000, seed: int = 0, max_new_tokens: int = 24) -> dict:
    """measure_bias with the scorer that fits the model; adds what was scored."""
    kind = kind or model_kind(model)
    if kind not in KINDS:
        raise ValueError(f"bias kind {kind!r}: one of {', '.join(KINDS)}")
    scorer = {"classifier": lambda: classifier_scorer(model, tokenizer, batch_size),
              "reward": lambda: reward_scorer(model, tokenizer, batch_size),
              "generator": lambda: generator_scorer(model, tokenizer, max_new_tokens, min(batch_size, 16), seed)}[kind]()
    return {"kind": kind, "score": SCORE_NAMES[kind],
            "terms": str(terms) if terms else "hf_tuner/evaluation/bias_terms.yaml",
            "dimensions": measure_bias(scorer, load_dimensions(terms), n_boot, seed)}


SCORE_NAMES = {"classifier": "P(positive)", "reward": "reward score", "generator": "vader compound of the continuation"}


def bias_table(results: dict[str, dict]) -> str:
    """One Markdown table: {model label: bias_for_model result} -> rows per dimension."""
    lines = ["| model | dimension | gap (highest - lowest) | 95% CI | highest | lowest |", "|---|---|---:|---|---|---|"]
    for label, res in results.items():
        for dim, r in res["dimensions"].items():
            lines.append(f"| {label} | {dim} | {r['gap']:.4f} | [{r['ci_low']:.4f}, {r['ci_high']:.4f}] | "
                         f"{r['highest']} ({r['group_means'][r['highest']]:.3f}) | "
                         f"{r['lowest']} ({r['group_means'][r['lowest']]:.3f}) |")
    return "\n".join(lines)


def bias_section(results: dict[str, dict]) -> list[str]:
    """Report lines for a run's report.md."""
    first = next(iter(results.values()))
    return ["## Counterfactual bias checks", "",
            f"Score: {first['score']}. Each template is filled with every group's terms ({first['terms']}); the gap "
            "is the highest minus the lowest group mean, with a 95% percentile-bootstrap interval over templates "
            "(1000 resamples). 0 means the swapped term does not move the score.", "", bias_table(results), ""]


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

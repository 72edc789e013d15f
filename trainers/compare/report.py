"""`trainers compare`'s outputs: results.json / results.csv (one row per run), report.md (mean ± spread
over seeds per condition, with chance and real-image rows), accuracy_bars.png and samples.png.

Everything here is made from committed units (their manifests and eval.json files), so it is rewritten
cheaply on every compare, including a rerun that trains nothing.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import ConfigError
from manifests import write_bytes_atomic, write_json_atomic
from trainers.compare.fewshot import FIGURE, fewshot_lines, fewshot_summary, plot_fewshot
from trainers.compare.plots import plot_accuracy, plot_samples
from trainers.compare.tables import cell, markdown_table, number
from world.attribute_precision import ATTRIBUTES  # what the probe reads, in table order

if TYPE_CHECKING:
    from trainers.compare.config import CompareConfig, CompareResult
    from trainers.compare.units import Unit

SCORES = (
    *ATTRIBUTES,
    "count",
    "all",
)  # trainers.probe.probe.score_objects: all = every named attribute right
SPLITS = {  # results column prefix -> eval.json field
    "acc": "attribute_accuracy",
    "acc_seen": "attribute_accuracy_seen_pairs",
    "acc_held_out": "attribute_accuracy_held_out_pairs",
}
METRICS = ("fid", "clip_score", "acc_mean") + tuple(f"{p}_{a}" for p in SPLITS for a in SCORES)
ID_COLUMNS = ("generator", "condition", "seed", "size", "steps", "batch_size", "lr", "pairs")
RUN_COLUMNS = ("train_steps", "pairs_digest", "train_s", "eval_s", "checkpoint", "key")
CSV_COLUMNS = (*ID_COLUMNS, "fid_features", *METRICS, *RUN_COLUMNS)
TABLE = (("fid", "FID"), ("clip_score", "CLIP score")) + tuple(
    (f"acc_{a}", a) for a in (*ATTRIBUTES, "mean", "all")
)


# ---------------------------------------------------------------------------------------------------------
# Rows and statistics
# ---------------------------------------------------------------------------------------------------------


def run_row(unit: Unit, manifest: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
    """One results row: what the run was, and what its eval measured."""
    train = unit.train
    row: dict[str, Any] = {
        "generator": unit.kind,
        "condition": unit.condition,
        "seed": unit.seed,
        "size": train.size,
        "steps": unit.params.get("budget", train.steps),  # all of it (a fewshot run's pre-training too)
        "batch_size": train.batch_size,
        "lr": train.lr,
        "pairs": getattr(train, "paired_limit", None),  # a family without paired data has none
        "fid_features": evaluation.get("fid_features"),
        "fid": evaluation.get("fid"),
        "clip_score": evaluation.get("clip_score"),
    }
    for prefix, key in SPLITS.items():
        accuracy = evaluation.get(key) or {}
        row.update({f"{prefix}_{a}": accuracy.get(a) for a in SCORES})
    row["acc_mean"] = mean_accuracy(row)
    timings = manifest.get("timings", {})
    row.update(
        train_steps=train.steps,
        pairs_digest=(manifest.get("pairs") or {}).get("digest"),
        train_s=timings.get("train_s"),
        eval_s=timings.get("eval_s"),
        checkpoint=manifest.get("checkpoint"),
        key=manifest.get("key"),
    )
    return row


def mean_accuracy(scores: dict[str, Any], prefix: str = "acc") -> float | None:
    """The mean of the four attribute accuracies (shape, colour, size, position): the headline number."""
    values = [scores.get(f"{prefix}_{a}") for a in ATTRIBUTES]
    if any(v is None for v in values):
        return None
    return round(float(np.mean(values)), 4)


def stats(values: list[float | None]) -> dict[str, float | None]:
    """mean, std (sample, over seeds; None for one seed), min, max and n of the values given."""
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not kept:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    array = np.asarray(kept)
    std = float(array.std(ddof=1)) if len(kept) > 1 else None
    return {
        "mean": round(float(array.mean()), 4),
        "std": None if std is None else round(std, 4),
        "min": round(float(array.min()), 4),
        "max": round(float(array.max()), 4),
        "n": len(kept),
    }


def summarise(rows: list[dict[str, Any]], conditions: tuple[str, ...]) -> dict[str, dict[str, dict]]:
    return {c: {m: stats([r[m] for r in rows if r["condition"] == c]) for m in METRICS} for c in conditions}


def chance_levels(evaluation: dict[str, Any]) -> tuple[dict[str, dict[str, float]], str]:
    """Chance accuracy per split (`acc`, `acc_seen`, `acc_held_out`) and attribute, and where it comes
    from: eval.json's own `attribute_accuracy*_chance` (trainers.eval.evaluate.attribute_chance, the one
    definition); an eval.json written before it had them gets the same function on the synthetic
    prompts that eval drew; one whose attributes were not measured (a cache without world labels) has
    none."""
    attributes = evaluation.get("attributes") or {}
    if attributes.get("measured") is False:
        return {}, f"none: attributes not measured ({attributes.get('why_not')})"
    given = {prefix: evaluation.get(f"{key}_chance") for prefix, key in SPLITS.items()}
    if any(isinstance(levels, dict) for levels in given.values()):
        levels = {prefix: levels for prefix, levels in given.items() if isinstance(levels, dict)}
        return levels, "eval.json's chance levels (the expected score of uniform guessing on its prompts)"
    from trainers.eval.evaluate import attribute_chance, names_held_out_pair, synthetic_prompts
    from world.attribute_precision import caption_objects

    n, seed = int(evaluation["n"]), int(evaluation["seed"])
    max_objects = (evaluation.get("prompts") or {}).get("max_objects") or 2
    unique = synthetic_prompts(min(n, 1000), seed, max_objects)  # as trainers.eval.evaluate draws them
    targets = [caption_objects(unique[i % len(unique)]) for i in range(n)]
    splits = {
        "acc": targets,
        "acc_seen": [t for t in targets if not names_held_out_pair(t)],
        "acc_held_out": [t for t in targets if names_held_out_pair(t)],
    }
    chance = {prefix: attribute_chance(subset) or {} for prefix, subset in splits.items()}
    return chance, "expected score of uniform guessing on the eval prompts (trainers.eval.evaluate)"


def real_levels(evaluation: dict[str, Any]) -> dict[str, float | None]:
    """Real cache images scored by the same probe (the instrument's ceiling), their CLIP score, and the FID
    of two disjoint halves of them (in the FID's features)."""
    real = {"fid": evaluation.get("fid_real"), "clip_score": evaluation.get("clip_score_real")}
    accuracy = evaluation.get("attribute_accuracy_real") or {}
    real.update({f"acc_{a}": accuracy.get(a) for a in SCORES})
    real["acc_mean"] = mean_accuracy(real)
    return real


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------


def write_outputs(config: CompareConfig, units: list[Unit], result: CompareResult) -> None:
    """Fill `result` (rows, summary, chance, real, features, files) and write every output file."""
    from manifests.errors import read_json
    from trainers.compare.units import manifest_file, read_unit_manifest

    out = Path(config.out)
    manifests, evaluations = {}, {}
    for unit in units:
        manifest = read_unit_manifest(out, unit.name)
        if manifest is None or manifest.get("key") != unit.key:
            raise ConfigError(f"--out {out}: run {unit.name} is not committed; rerun `trainers compare`")
        manifests[unit.name] = manifest
        fix = f"delete {manifest_file(out, unit.name)} and rerun `trainers compare`: the run is redone"
        evaluations[unit.name] = read_json(out / manifest["eval"], fix)
    check_provenance(units, evaluations)
    result.rows = [run_row(u, manifests[u.name], evaluations[u.name]) for u in units]
    result.summary = summarise(result.rows, config.conditions)
    first = evaluations[units[0].name]
    result.chance, chance_source = chance_levels(first)
    for levels in result.chance.values():
        levels["mean"] = mean_accuracy({f"acc_{a}": levels.get(a) for a in ATTRIBUTES})
    result.real = real_levels(first)

    if config.features:
        result.features = _feature_report(config, result)
    files = result.files
    files["results_json"] = out / "results.json"
    write_json_atomic(
        files["results_json"],
        {
            "config": config.to_dict(),
            "command": _command(config),
            "rows": result.rows,
            "summary": result.summary,
            "chance": result.chance,
            "chance_source": chance_source,
            "real": result.real,
            "fewshot": fewshot_summary(config, result),
            "eval": {k: first.get(k) for k in ("n", "n_real", "seed", "prompts", "fid_features", "probe")},
        },
    )
    files["results_csv"] = out / "results.csv"
    write_bytes_atomic(files["results_csv"], csv_text(result.rows).encode())
    files["accuracy_bars"] = plot_accuracy(out / "accuracy_bars.png", config, result)
    if (figure := plot_fewshot(out / FIGURE, config, result)) is not None:
        files["fewshot"] = figure
    samples = {
        u.condition: [out / p for p in manifests[u.name]["samples"]]
        for u in units
        if u.seed == config.seeds[0]
    }
    files["samples"] = plot_samples(out / "samples.png", config, samples)
    for name in ("features.md", "features.json", "similarity_histograms.png"):
        if (out / name).is_file() and result.features is not None:
            files[name.replace(".", "_")] = out / name
    files["report"] = out / "report.md"
    report = report_markdown(config, result, first, chance_source)
    write_bytes_atomic(files["report"], report.encode())


def check_provenance(units: list, evaluations: dict[str, dict]) -> None:
    """Runs summarised in one row (one condition, several seeds) must have read the same features."""
    seen: dict[str, tuple[str, Any]] = {}
    for unit in units:
        record = (evaluations[unit.name].get("training_data") or {}).get("provenance") or {}
        mark = (record.get("manifests_digest"), record.get("method"))
        first = seen.setdefault(unit.condition, (unit.name, mark))
        if first[1] != mark:
            raise ConfigError(
                f"runs {first[0]} and {unit.name} of condition {unit.condition} read different features "
                f"(method, manifests {first[1]} vs {mark}): the cache changed between them; rerun "
                "`trainers compare`, which remakes the stale runs"
            )


def _command(config: CompareConfig) -> str:
    from trainers.compare.config import command_line

    return command_line(config)


def _feature_report(config: CompareConfig, result: CompareResult) -> dict[str, Any] | None:
    """trainers.compare.features on the cache; a full compare keeps its runs' report without it."""
    from trainers.compare.features import features_only

    try:
        return features_only(config)
    except (ImportError, ConfigError) as e:
        result.notes.append(f"feature-level report not written: {e}")
        return None


def csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CSV_COLUMNS})
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------


def main_table(result: CompareResult) -> list[str]:
    """Overall metrics per condition, with the chance and real-image rows."""
    from trainers.eval.evaluate import fid_label

    features = next((r.get("fid_features") for r in result.rows), None)
    header = ["condition", "runs", fid_label(features)] + [label for _, label in TABLE[1:]]
    rows = []
    for condition, summary in result.summary.items():
        n = sum(r["condition"] == condition for r in result.rows)
        rows.append([condition, str(n)] + [cell(summary[m]) for m, _ in TABLE])
    chance = result.chance.get("acc", {})
    rows.append(["chance", ""] + ["-", "-"] + [number(chance.get(m[4:])) for m, _ in TABLE[2:]])
    rows.append(["real images", ""] + [number(result.real.get(m)) for m, _ in TABLE])
    return markdown_table(header, rows)


def split_table(result: CompareResult) -> list[str]:
    """Accuracy on prompts naming only colour-shape pairs seen in training vs a held-out pair."""
    header = ["condition"]
    for a in (*ATTRIBUTES, "all"):
        header += [f"{a} seen", f"{a} held-out"]
    rows = []
    for condition, summary in result.summary.items():
        row = [condition]
        for a in (*ATTRIBUTES, "all"):
            row += [cell(summary[f"acc_seen_{a}"], False), cell(summary[f"acc_held_out_{a}"], False)]
        rows.append(row)
    chance = ["chance"]
    for a in (*ATTRIBUTES, "all"):
        for prefix in ("acc_seen", "acc_held_out"):
            chance.append(number(result.chance.get(prefix, {}).get(a)))
    return markdown_table(header, rows + [chance])


def text_table(result: CompareResult) -> str:
    """The main table, for the terminal."""
    return "\n".join(main_table(result))


def prompts_named_line(evaluation: dict[str, Any]) -> list[str]:
    """The line saying how many eval prompts name each attribute (accuracy counts only those), when some
    name fewer than all four: the partial-caption world's prompts."""
    named = (evaluation.get("prompts") or {}).get("by_attribute") or {}
    n = evaluation.get("n")
    counts = {a: named.get(a) for a in ATTRIBUTES}
    if not named or all(c == n for c in counts.values()):
        return []
    said = ", ".join(f"{a} {c}" for a, c in counts.items())
    return [
        "",
        f"Prompts name 1-4 attributes; each attribute's accuracy counts only the prompts naming it ({said} "
        f"of {n}).",
    ]


def report_markdown(
    config: CompareConfig, result: CompareResult, evaluation: dict[str, Any], chance_source: str
) -> str:
    seeds = ", ".join(map(str, config.seeds))
    lr = "the generator's default lr" if config.lr is None else f"lr {config.lr}"
    lines = [
        f"# trainers compare: {', '.join(config.conditions)}",
        "",
        f"One `{config.generator}` (size {config.size}) per condition and seed ({seeds}), each trained "
        f"{config.steps:,} steps of batch {config.batch_size} with {lr}, and evaluated by `trainers eval` "
        f"with the same {evaluation.get('n')} prompts and seed {config.eval_seed} (probe on "
        f"{(evaluation.get('probe') or {}).get('image_size')} px images). Cells: mean ± std over seeds "
        "(min-max). FID is on "
        f"`{evaluation.get('fid_features')}` features (lower is better; compare it only within this table); "
        "CLIP score and attribute accuracy are higher-is-better. `all`: every attribute of an object right.",
        "",
        *main_table(result),
        "",
        *fewshot_lines(config, result),
        f"Chance: {chance_source}. Real images: the cache's own images scored against their labels by the "
        "same probe, the instrument's ceiling; their CLIP score against their own captions; their FID: "
        "two disjoint halves of them against each other.",
        *prompts_named_line(evaluation),
        "",
        "## Seen vs held-out colour-shape pairs",
        "",
        "Accuracy on eval prompts naming only pairs some training image has (seen) vs a pair no image has "
        "(held-out: compositional generalisation). Mean ± std over seeds.",
        "",
        *split_table(result),
        "",
        "## Figures",
        "",
        "![attribute accuracy per condition](accuracy_bars.png)",
        "",
        f"![samples: one row per prompt, one column per condition (seed {config.seeds[0]})](samples.png)",
        "",
    ]
    lines += ["## Feature level", ""]
    if result.features is not None:
        lines += [
            "The pseudo text features themselves, no training: [features.md](features.md) "
            "([features.json](features.json)).",
            "",
            "![Lafite2 Figure 1: cosine similarity histograms](similarity_histograms.png)",
            "",
        ]
    else:
        lines += [
            "; ".join(result.notes) or "not written (features disabled).",
            "",
            f"Write it alone with `trainers compare --cache {config.cache} --out {config.out} "
            "--features-only`.",
            "",
        ]
    lines += ["## Runs", ""]
    lines += markdown_table(
        ["run", "train s", "eval s", "checkpoint", "key"],
        [
            [
                f"{r['condition']}-s{r['seed']}",
                number(r["train_s"], 1),
                number(r["eval_s"], 1),
                f"`{r['checkpoint']}`",
                f"`{r['key'][:12]}`",
            ]
            for r in result.rows
        ],
    )
    lines += [
        "",
        "## Command",
        "",
        "```bash",
        _command(config),
        "```",
        "",
        "<details><summary>Resolved config</summary>",
        "",
        "```json",
        json.dumps(config.to_dict(), indent=1),
        "```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Figures (matplotlib without pyplot: no global state, no display needed)
# ---------------------------------------------------------------------------------------------------------

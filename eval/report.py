"""Write an evaluation's files: results.jsonl, summary.json, report.md and PNG plots."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from draftsmith.drafters.errors import DraftsmithError  # noqa: E402

if TYPE_CHECKING:
    from draftsmith.eval.cost_model import CostModel


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _overview(summary: dict[str, Any]) -> list[str]:
    lines = [
        "| category | questions | tau | speedup | plain tok/s | spec tok/s | lossless mismatches |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    parts = [*summary["by_category"].items(), ("**all**", summary)]
    for name, part in parts:
        tps = part["tokens_per_s"]
        lines.append(
            f"| {name} | {part['n_questions']} | {_fmt(part['tau'])} | {_fmt(part['speedup'])}x | "
            f"{_fmt(tps['plain'], 1)} | {_fmt(tps['speculative'], 1)} | {part['lossless_mismatches']} |"
        )
    return lines


def _category_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| question | new tokens | tau | plain tok/s | spec tok/s | speedup | lossless |",
        "| --- | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for row in rows:
        steps = row["accept_lengths"]
        tau = sum(steps) / len(steps) if steps else 0.0
        plain = row["plain_new_tokens"] / row["plain_wall_time"] if row["plain_wall_time"] else 0.0
        spec = row["new_tokens"] / row["wall_time"] if row["wall_time"] else 0.0
        lossless = "n/a" if row["lossless"] is None else ("yes" if row["lossless"] else "**no**")
        lines.append(
            f"| {row['id']} | {row['new_tokens']} | {tau:.2f} | {plain:.1f} | {spec:.1f} | "
            f"{spec / plain if plain else 0.0:.2f}x | {lossless} |"
        )
    return lines


def drift_sentence(summary: dict[str, Any]) -> str | None:
    """The adapted target's distance from the original one (Medusa-2 only: ``adapter_drift`` in the summary)."""
    drift = summary.get("adapter_drift")
    if drift is None:
        return None
    identical = drift["identical_answers"]
    return (
        "The target is LoRA-adapted (Medusa-2). Against the original target's greedy answers, the adapted target "
        f"ranks {_fmt(drift['top1_agreement'], 3)} of their tokens first in the same context, and gives the same "
        f"greedy answer token for token on {'n/a (sampled run)' if identical is None else f'{identical:.3f}'} "
        "of the turns."
    )


def shape_sentence(settings: dict[str, Any]) -> str:
    """How the drafts were sized: a fixed tree, or per step by the measured cost model (``tree_nodes=auto``)."""
    shape = settings.get("draft_shape")
    if shape is None:
        return f", a {settings['tree_nodes']}-node candidate tree" if "tree_nodes" in settings else ""
    cost = shape["cost_model"]
    plain_share = shape["plain_step_share"]
    return (
        f", draft size chosen per step by the measured cost model (most often {shape['most_chosen_nodes']} nodes; "
        f"{'n/a' if plain_share is None else f'{100 * plain_share:.0f}%'} plain steps; {cost['dtype']} on "
        f"{cost['device']} with {cost['threads']} thread(s), a plain step {cost['plain_step_ms']:.1f} ms)"
    )


def shape_line(summary: dict[str, Any]) -> str:
    """One sentence for a model card: the draft shape the evaluation used, and the dtype it decoded in."""
    settings = summary.get("settings", {})
    how = shape_sentence(settings).removeprefix(", ") or "the drafter's own drafts"
    return f"Drafts: {how}; the target decoded in {settings.get('dtype', 'float32')}."


def match_sentence(summary: dict[str, Any]) -> str | None:
    """Outside float32 a batched verification rounds differently from a one-token step, so greedy outputs may
    part from plain decoding's: the share of turns that did not is the figure to read there."""
    dtype = summary["settings"].get("dtype", "float32")
    if dtype == "float32" or summary.get("match_rate") is None:
        return None
    return (
        f"In {dtype} greedy equality is not exact (a verification of many rows rounds differently from a one-token "
        f"step): {_fmt(100 * summary['match_rate'], 1)}% of the turns are token for token plain {dtype} decoding's "
        "(match rate); lossless mismatches count the questions where they part."
    )


def markdown(summary: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    settings = summary["settings"]
    tree_note = shape_sentence(settings)
    lines = [
        f"# Speculative decoding: `{summary['drafter']}` on `{summary['target']}`",
        "",
        f"{summary['n_questions']} questions, max_new_tokens={settings['max_new_tokens']}, "
        f"temperature={settings['temperature']}, top_p={settings['top_p']}, seed={settings['seed']}"
        f"{tree_note}. "
        "Plain and speculative decoding interleaved per turn in one process; speedup is their ratio of "
        "tokens/s. tau = tokens appended per verification forward (bonus token included; the prefill "
        "forward is not counted).",
        "",
        f"alpha_k: {', '.join(f'{a:.2f}' for a in summary['alpha']) or 'n/a (no draft tokens)'}",
        "",
        *_overview(summary),
    ]
    for sentence in (match_sentence(summary), drift_sentence(summary)):
        if sentence:
            lines += ["", sentence]
    for category in summary["by_category"]:
        lines += ["", f"## {category}", "", *_category_table([r for r in rows if r["category"] == category])]
    return "\n".join(lines) + "\n"


def plots(summary: dict[str, Any], rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    written = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    alpha = summary["alpha"]
    ax.plot(range(1, len(alpha) + 1), alpha, marker="o")
    ax.set(xlabel="draft position k", ylabel="alpha_k", ylim=(0, 1.05), title="per-position acceptance")
    written.append(_save(fig, out / "alpha_k.png"))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    counts = Counter(n for row in rows for n in row["accept_lengths"])
    ax.bar(list(counts), list(counts.values()))
    ax.set(xlabel="tokens appended per verification step", ylabel="steps", title="accept-length histogram")
    written.append(_save(fig, out / "accept_lengths.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(summary["by_category"])
    ax.bar(names, [summary["by_category"][c]["tau"] for c in names])
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set(ylabel="tau", title="tau per category")
    ax.tick_params(axis="x", rotation=30)
    written.append(_save(fig, out / "tau_by_category.png"))
    return written


def cost_plot(cost: CostModel, path: Path) -> Path:
    """The measured verification cost against rows verified, one line per cache size, relative to a plain step."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for capacity, line in zip(cost.capacities, cost.verify_s, strict=True):
        label = f"cache {capacity}, plain {1000 * line[0]:.1f} ms"
        ax.plot(cost.rows, [t / line[0] for t in line], marker="o", label=label)
    key = cost.key
    ax.set(
        xlabel="rows verified (root + draft nodes)",
        ylabel="step time / plain step",
        title=f"{key['target']}, {key['dtype']}, {key['device']}, {key['threads']} thread(s)",
    )
    ax.legend()
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(out: Path, summary: dict[str, Any], rows: Sequence[dict[str, Any]]) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "results.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "report.md").write_text(markdown(summary, rows))
        plots(summary, rows, out)
    except OSError as err:  # a file where the folder should be, no permission, a full disk
        raise DraftsmithError(
            f"cannot write the evaluation to {err.filename or out} ({err.strerror or err}): pass out= a folder you "
            "can write to, on a disk with free space"
        ) from None

"""The job report: a Markdown table (FP16 / RTN / AWQ) and a PNG chart, stored with the model."""

from __future__ import annotations

from pathlib import Path

from quantization.gate import GateCheck
from quantization.recipes import QuantRecipe

ROWS = (("fp16", "FP16"), ("rtn", "RTN"), ("awq", "AWQ"))


def quality_table(qualities: dict[str, dict]) -> str:
    fp_ppl = qualities["fp16"]["perplexity"]
    lines = [
        "| model | perplexity | rise vs FP16 | KL vs FP16 | top-1 agreement | size MB |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in ROWS:
        q = qualities[key]
        size = q.get("size_bytes")
        lines.append(
            f"| {label} | {q['perplexity']:.3f} | {q['perplexity'] - fp_ppl:+.3f} | "
            f"{q['kl_vs_reference']:.4f} | {q['top1_agreement']:.3f} | "
            f"{'-' if size is None else f'{size / 1e6:.1f}'} |"
        )
    return "\n".join(lines)


def gate_lines(gate: dict) -> list[str]:
    """One line per check: verdict, measured value and limit."""
    return [f"- {GateCheck(**c).line()}" for c in gate["checks"]]


def served_lines(served: dict | None) -> list[str]:
    if served is None:
        return ["Served-path check: did not run (see the gate line above)."]
    by_path = ", ".join(f"{k} {v:.2e}" for k, v in served["kl_by_path"].items())
    lines = [
        f"Served-path check ({served['engine']}): KL vs transformers forward of the same "
        f"artifact {served['kl_per_token']:.2e} nats/token, top-1 agreement "
        f"{served['top1_agreement']:.4f} over {served['tokens_compared']} positions "
        f"(by path: {by_path}).",
    ]
    for a in served["chat"]:
        lines.append(
            f'- chat "{a["question"]}" (key fact {a["key_fact"]}): FP16: '
            f'"{_one_line(a["reference_answer"])}"; served: "{_one_line(a["served_answer"])}"'
        )
    return lines


def _one_line(text: str, limit: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def held_out_line(evaluation: dict, recipe: QuantRecipe) -> str:
    held = evaluation.get("held_out")
    if not held:
        return f"Held-out text: {evaluation['eval_tokens']} tokens of {recipe.evaluation.source}."
    return (
        f"Held-out text: {evaluation['eval_tokens']} tokens from {held['description']}. "
        f"Deduplicated against the calibration text ({recipe.calibration.source}) at "
        f"{held['ngram']}-word n-grams: {held['words_removed']} of {held['words_before']} words "
        f"removed ({held['removed_pct']:.1f}%)."
    )


def markdown(
    name: str, recipe: QuantRecipe, evaluation: dict, timings: dict[str, float], outcome: str
) -> str:
    q = evaluation["qualities"]
    rtn_rise = q["rtn"]["perplexity"] - q["fp16"]["perplexity"]
    awq_rise = q["awq"]["perplexity"] - q["fp16"]["perplexity"]
    ratio = f"{awq_rise / rtn_rise:.2f}" if rtn_rise > 0 else "n/a"
    gate = evaluation["gate"]
    loaders = ", ".join(recipe.loaders) or "none"
    return "\n".join(
        [
            f"# {name}: {recipe.name} (w{recipe.w_bit}, g{recipe.q_group_size}, "
            f"{'zero point' if recipe.zero_point else 'symmetric'}, {recipe.version})",
            "",
            held_out_line(evaluation, recipe),
            "",
            quality_table(q),
            "",
            f"AWQ's perplexity rise is {ratio}x RTN's.",
            "",
            f"Gate: {'PASSED' if gate['passed'] else 'FAILED'}",
            *gate_lines(gate),
            "",
            *served_lines(evaluation.get("served_check")),
            "",
            f"Loads in: {loaders}.",
            f"Outcome: {outcome}.",
            "",
            "Times: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()),
        ]
    )


def chart(qualities: dict[str, dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for _, label in ROWS]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    axes[0].bar(
        labels, [qualities[k]["perplexity"] for k, _ in ROWS], color=["#888", "#c55", "#37a"]
    )
    axes[0].set_title("held-out perplexity (lower is better)")
    axes[1].bar(
        labels, [qualities[k]["top1_agreement"] for k, _ in ROWS], color=["#888", "#c55", "#37a"]
    )
    axes[1].set_title("top-1 agreement with FP16")
    axes[1].set_ylim(0, 1)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""The job report: a Markdown table (FP16 / RTN / AWQ) and a PNG chart, stored with the model."""

from __future__ import annotations

from pathlib import Path

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


def markdown(name: str, recipe: QuantRecipe, evaluation: dict, timings: dict[str, float]) -> str:
    q = evaluation["qualities"]
    rtn_rise = q["rtn"]["perplexity"] - q["fp16"]["perplexity"]
    awq_rise = q["awq"]["perplexity"] - q["fp16"]["perplexity"]
    ratio = f"{awq_rise / rtn_rise:.2f}" if rtn_rise > 0 else "n/a"
    gate = evaluation["gate"]
    verdict = "PASSED" if gate["passed"] else "FAILED: " + "; ".join(gate["reasons"])
    return "\n".join(
        [
            f"# {name}: {recipe.name} (w{recipe.w_bit}, g{recipe.q_group_size}, "
            f"{'zero point' if recipe.zero_point else 'symmetric'}, {recipe.version})",
            "",
            f"Held-out text: {evaluation['eval_tokens']} tokens of {recipe.evaluation.source} "
            f"never used for calibration ({recipe.calibration.source}).",
            "",
            quality_table(q),
            "",
            f"AWQ's perplexity rise is {ratio}x RTN's. Gate: {verdict}.",
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

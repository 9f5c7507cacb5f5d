"""The report of the benchmark, from its rows: the markdown table, the speed-up picture, the small-batch report
(`smallest_batches_at_bound`: per model and keep rate, the smallest measured batch size at which EViT reaches
`BOUND_SHARE` of its MACs ratio) and the files `write_benchmark_files` writes. matplotlib loads on first use.
"""

import importlib.util
import json
import os

from .configuration_evit_base import format_keep_rate
from .messages import writable_folder_problem


# A row whose speed-up is this share of its MACs ratio or more has reached the bound (the small-batch report).
BOUND_SHARE = 0.95


def _key(value):
    """A row value usable in a set or as a key: a per-layer keep rate (a list) as a tuple."""
    return tuple(value) if isinstance(value, list) else value


def _mean_keep_rate(keep_rate) -> float:
    """Where a per-layer keep rate sits on a keep-rate axis: the mean of its rates."""
    return sum(keep_rate) / len(keep_rate) if isinstance(keep_rate, list) else keep_rate


TABLE_COLUMNS = ["mode", "device", "dtype", "compiled", "batch_size", "image_size", "variant", "keep_rate"]
TABLE_COLUMNS += ["images_per_s", "latency_ms", "peak_memory_mb", "speedup", "macs_ratio", "speedup_over_macs_ratio"]


def markdown_table(rows: list[dict], columns: list[str] = TABLE_COLUMNS) -> str:
    """The rows as a Markdown table of `columns`: ratios with 3 decimals, other numbers with 1."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            if isinstance(value, float):
                cells.append(
                    f"{value:.3f}"
                    if column in ("speedup", "macs_ratio", "speedup_over_macs_ratio")
                    else f"{value:.1f}"
                )
            elif column == "keep_rate" and isinstance(value, list):
                cells.append(format_keep_rate(value))
            else:
                cells.append("" if value is None else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_speedups(rows: list[dict], path: str) -> None:
    """Speed-up over the stock model against keep rate, one line per setting, with the MACs bound dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    series = {}
    for row in rows:
        if row["variant"] != "evit":
            continue
        label = f"{row['mode']} {row['device']} {row['dtype']} bs{row['batch_size']} {row['image_size']}px"
        label += " compiled" if row["compiled"] else ""
        series.setdefault(label, []).append(row)
    for label, points in series.items():
        points.sort(key=lambda row: -_mean_keep_rate(row["keep_rate"]))
        axis.plot(
            [_mean_keep_rate(p["keep_rate"]) for p in points], [p["speedup"] for p in points], marker="o", label=label
        )
    bound = sorted(
        {(_mean_keep_rate(row["keep_rate"]), row["macs_ratio"]) for row in rows if row["variant"] == "evit"},
        reverse=True,
    )
    axis.plot([k for k, _ in bound], [r for _, r in bound], linestyle="--", color="grey", label="MACs bound")
    axis.set_xlabel("keep rate (per-layer rates: their mean)")
    axis.set_ylabel("speed-up over the stock model")
    axis.invert_xaxis()
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


NOT_REACHED = "not reached"
# The settings that make one small-batch entry: every row setting but the batch size.
_SMALL_BATCH_KEYS = ("model", "mode", "device", "dtype", "compiled", "image_size", "attn_implementation", "keep_rate")


def smallest_batches_at_bound(rows: list[dict], share: float = BOUND_SHARE) -> list[dict]:
    """Per model and keep rate (and each other setting but the batch size): the smallest measured batch size at which
    EViT's speed-up reaches `share` of its MACs ratio, or `NOT_REACHED` where no measured batch size does."""
    entries = {}
    for row in rows:
        if row["variant"] != "evit":
            continue
        key = tuple(_key(row[name]) for name in _SMALL_BATCH_KEYS)
        entry = entries.setdefault(
            key,
            {**{name: row[name] for name in _SMALL_BATCH_KEYS}, "macs_ratio": row["macs_ratio"],
             "speedup_over_macs_ratio": {}},
        )  # fmt: skip
        entry["speedup_over_macs_ratio"][row["batch_size"]] = row["speedup_over_macs_ratio"]
    for entry in entries.values():
        reached = sorted(size for size, ratio in entry["speedup_over_macs_ratio"].items() if ratio >= share)
        entry["smallest_batch_size"] = reached[0] if reached else NOT_REACHED
        entry["bound_share"] = share
    return list(entries.values())


def small_batch_markdown(entries: list[dict]) -> str:
    """The small-batch report as a markdown table: one line per model and keep rate (and other setting)."""
    share = f"{entries[0]['bound_share']:.0%}" if entries else f"{BOUND_SHARE:.0%}"
    columns = [*_SMALL_BATCH_KEYS, "macs_ratio", f"smallest batch size at {share} of the MACs ratio"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for entry in entries:
        cells = [
            format_keep_rate(entry[name]) if isinstance(entry[name], list) else str(entry[name])
            for name in _SMALL_BATCH_KEYS
        ]
        cells += [f"{entry['macs_ratio']:.3f}", str(entry["smallest_batch_size"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_markdown(results: dict) -> str:
    """The rows' table and the small-batch report, as `evit-hf benchmark` prints them and writes benchmark.md."""
    return markdown_table(results["rows"]) + "\n\n" + small_batch_markdown(results["small_batches"])


OUTPUT_FILES = ("benchmark.json", "benchmark.md", "benchmark.png")


def output_dir_problem(output_dir: str) -> str | None:
    """Why the benchmark could not write its files into `output_dir` once it has run, or None if it can."""
    if not output_dir:
        return "give a folder name (an empty one writes nowhere)"
    problem = writable_folder_problem(output_dir)
    if problem:
        return f"cannot write into {output_dir}: {problem}"
    for name in OUTPUT_FILES:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            return f"cannot write {path}: it is a folder or not writable"
    if importlib.util.find_spec("matplotlib") is None:
        return "drawing benchmark.png needs matplotlib: pip install matplotlib (or leave out --output-dir)"
    return None


def write_benchmark_files(results: dict, output_dir: str) -> None:
    """benchmark.json (everything), benchmark.md (`results_markdown`) and benchmark.png (`plot_speedups`)."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "benchmark.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    with open(os.path.join(output_dir, "benchmark.md"), "w") as handle:
        handle.write(results_markdown(results) + "\n")
    plot_speedups(results["rows"], os.path.join(output_dir, "benchmark.png"))


__all__ = [
    "BOUND_SHARE",
    "NOT_REACHED",
    "OUTPUT_FILES",
    "markdown_table",
    "output_dir_problem",
    "plot_speedups",
    "results_markdown",
    "small_batch_markdown",
    "smallest_batches_at_bound",
    "write_benchmark_files",
]

"""Plot training curves: one panel per metric, one line per run, x = optimizer step.

Usage:
    python benchmarks/plot_log.py OUT [OUT ...] --out PNG [--metrics loss,acc] [--title T]

OUT is a run's --out folder. Its steps.jsonl has one record per log step ({"step", "epoch",
"loss", the method's pretext metrics, "lr", "img_s"}): the lines. Its log.jsonl, if there, has
one record per saved checkpoint: dots on the lines. Records without "step" or without the plotted
metric (such as {"resumed_at": ...}) are skipped. Default metrics: loss, then every other numeric
key but step, epoch, lr and img_s. The legend names each run by its folder.

Bad input (a folder without steps.jsonl, an empty file, a metric no run logged) ends with one
`error: ...` line and exit code 1. matplotlib is a benchmark extra (requirements-test.txt).
"""
import argparse
import json
import math
import os

# bookkeeping keys of a steps.jsonl record, not curves worth a panel
NOT_METRICS = ("step", "epoch", "lr", "img_s")


def read_jsonl(path):
    """A JSON-lines file -> list of dicts; a line that is not a JSON object is one error line."""
    records = []
    with open(path) as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise SystemExit(f"error: {path} line {i} is not JSON: {line.strip()[:80]}")
            if not isinstance(record, dict):
                raise SystemExit(f"error: {path} line {i} is not a JSON object")
            records.append(record)
    return records


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_run(out):
    """OUT -> (log-step records, checkpoint records), each with a numeric "step", sorted by it."""
    path = os.path.join(out, "steps.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found: pass the --out folder of a training run")
    steps = [r for r in read_jsonl(path) if is_number(r.get("step"))]
    if not steps:
        raise SystemExit(f"error: {path} has no log records (one comes every --log-every steps)")
    log_path = os.path.join(out, "log.jsonl")
    saves = read_jsonl(log_path) if os.path.isfile(log_path) else []
    saves = [r for r in saves if is_number(r.get("step"))]
    return sorted(steps, key=lambda r: r["step"]), sorted(saves, key=lambda r: r["step"])


def default_metrics(runs):
    """loss first, then every other numeric key in the order the runs first logged it."""
    names = ["loss"]
    for steps, _ in runs:
        for record in steps:
            for k, v in record.items():
                if k not in names and k not in NOT_METRICS and is_number(v):
                    names.append(k)
    return names


def curve(records, metric):
    """(steps, values) of the records that have a numeric value for metric."""
    kept = [r for r in records if is_number(r.get(metric))]
    return [r["step"] for r in kept], [r[metric] for r in kept]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="OUT", help="a run's --out folder")
    parser.add_argument("--out", required=True, metavar="PNG", help="picture to write")
    parser.add_argument("--metrics", default="", help="comma-separated keys (default: all)")
    parser.add_argument("--title", default="", help="figure title (default: none)")
    args = parser.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib, a benchmark extra: "
                         "pip install -r requirements-test.txt")

    runs = [load_run(out) for out in args.runs]
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] or default_metrics(runs)
    for m in metrics:
        if not any(curve(steps, m)[0] for steps, _ in runs):
            logged = ", ".join(default_metrics(runs))
            raise SystemExit(f"error: no run logged '{m}' in steps.jsonl (logged: {logged})")

    cols = min(len(metrics), 3)
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for out, (steps, saves) in zip(args.runs, runs):
            x, y = curve(steps, metric)
            if not x:
                continue
            name = os.path.basename(os.path.normpath(out))
            line = ax.plot(x, y, label=name, linewidth=1.2)[0]
            # log.jsonl repeats the last logged values at each checkpoint
            cx, cy = curve(saves, metric)
            ax.plot(cx, cy, "o", color=line.get_color(), markersize=3)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    # the last row's unused cells
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8, title="dots: checkpoints", title_fontsize=7)
    if args.title:
        fig.suptitle(args.title, fontsize=11)
    fig.tight_layout()
    try:
        fig.savefig(args.out, dpi=100)
    except (OSError, ValueError) as e:
        # a missing folder (OSError) or a file type matplotlib does not write (ValueError)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
        raise SystemExit(f"error: cannot write {args.out} ({reason})")


if __name__ == "__main__":
    main()

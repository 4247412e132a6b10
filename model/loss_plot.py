"""The loss curve of a run: train and validation loss against tokens seen, the learning rate
on a second axis, drawn from out_dir/log.jsonl. train.py redraws it as it trains and
plot.py on request. matplotlib is optional: without it plot_log says once how to get the
picture and training goes on.
"""

import json
import sys

from model.files import atomic_write

FIGURE_INCHES = (8, 5)
DPI = 100  # 800 x 500 pixels

_told_to_install = False  # the missing-matplotlib note is printed once per process


def read_log(path):
    """The records of log.jsonl, as the latest run sees them.

    The file is appended to by every run in the same folder. A resumed run repeats the steps
    after its checkpoint, and a new run starts again at step 0: a record whose step goes back
    replaces the records from that step on, so the curve shows one history."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if not isinstance(record, dict) or "step" not in record or "tokens" not in record:
                continue
            is_eval = "val_loss" in record
            while records and (records[-1]["step"] > record["step"] or
                               (records[-1]["step"] == record["step"] and ("val_loss" in records[-1]) == is_eval)):
                records.pop()
            records.append(record)
    return records


def plot_log(log_path, png_path):
    """Draw png_path from log_path. Returns False (after a one-time note) without matplotlib."""
    global _told_to_install
    try:
        # imported here, not at the top: training imports this module whether or not matplotlib is installed
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError:
        if not _told_to_install:
            print(f"note: pip install matplotlib to get {png_path}", file=sys.stderr)
            _told_to_install = True
        return False

    records = read_log(log_path)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]

    # no pyplot: a Figure of its own needs no display and leaves no global state behind
    fig = Figure(figsize=FIGURE_INCHES, dpi=DPI, layout="constrained")
    ax = fig.subplots()
    if steps:
        ax.plot([r["tokens"] for r in steps], [r["loss"] for r in steps], color="tab:blue", alpha=0.35,
                linewidth=1, label="train loss (one batch)")
    if evals:
        tokens = [r["tokens"] for r in evals]
        ax.plot(tokens, [r["train_loss"] for r in evals], "o-", color="tab:blue", markersize=3, label="train loss")
        ax.plot(tokens, [r["val_loss"] for r in evals], "o-", color="tab:orange", markersize=3, label="val loss")
        last = evals[-1]
        title = f"val loss {last['val_loss']:.4f}"
        if last.get("val_bpb") is not None:
            title += f" ({last['val_bpb']:.4f} bits per byte)"
        ax.set_title(f"{title} at step {last['step']}", fontsize=10)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats per token)")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.grid(alpha=0.3)

    lr_records = steps or evals  # the per-step records have the finer learning rate curve
    lr_axis = ax.twinx()
    if lr_records:
        lr_axis.plot([r["tokens"] for r in lr_records], [r["lr"] for r in lr_records], "--", color="tab:gray",
                     linewidth=1, label="learning rate")
    lr_axis.set_ylabel("learning rate", color="tab:gray")
    lr_axis.tick_params(axis="y", colors="tab:gray")
    lr_axis.set_ylim(bottom=0)

    lines, labels = ax.get_legend_handles_labels()
    lr_lines, lr_labels = lr_axis.get_legend_handles_labels()
    if lines or lr_lines:
        ax.legend(lines + lr_lines, labels + lr_labels, loc="upper right", fontsize=8)

    with atomic_write(png_path) as f:  # a viewer never sees half a picture
        fig.savefig(f, dpi=DPI, format="png")
    return True

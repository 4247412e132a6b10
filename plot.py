"""Draw a run's loss curve from its log.

    python plot.py out              # redraws out/loss.png from out/log.jsonl
    python plot.py out/log.jsonl

Train and validation loss against the number of tokens seen, with the learning rate on a
second axis. train.py calls plot_log at every evaluation. matplotlib is optional: without
it plot_log says once how to get the picture and training goes on.
"""

import json
import os
import sys

from model.cli import main_guard
from model.errors import UserError
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
        # imported here, not at the top: train.py imports this module whether or not matplotlib is installed
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


def main():
    args = sys.argv[1:]
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip())
        return
    if len(args) > 1:
        raise UserError("usage: python plot.py [OUT_DIR | OUT_DIR/log.jsonl]")
    target = args[0] if args else "out"
    log_path = os.path.join(target, "log.jsonl") if os.path.isdir(target) else target
    if not os.path.isfile(log_path):
        raise UserError(f"no log at {log_path} (train first: python train.py)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("plot.py needs matplotlib: pip install matplotlib") from None
    png_path = os.path.join(os.path.dirname(log_path), "loss.png")
    try:
        plot_log(log_path, png_path)
    except OSError as e:
        raise UserError(f"cannot write {png_path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UserError(f"{log_path} is not a text file") from None
    print(f"wrote {png_path}")


if __name__ == "__main__":
    main_guard(main)

"""Draw a run's loss curve from its log.

    python plot.py out              # redraws out/loss.png from out/log.jsonl
    python plot.py out/log.jsonl

Train and validation loss against the number of tokens seen, with the learning rate on a
second axis (the drawing itself is model/loss_plot.py, which train.py also calls at
evaluation). Needs matplotlib.
"""

import os
import sys

from model.cli import main_guard
from model.errors import UserError
from model.loss_plot import plot_log


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

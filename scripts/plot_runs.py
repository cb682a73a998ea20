"""Plot training loss and validation bpb of one or more train_gpt.py logs, against time and steps.

Usage:
    python scripts/plot_runs.py runs/*/train.log --out runs.png [--x time|step|both] [--title TEXT]

Reads `train step:S/N loss:L time_ms:T ...` and `val step:S loss:L bpb:B train_time_ms:T` lines (a
val line without a time gets one interpolated from the train lines), and the final scores of the
`final {json}` line (flat, sliding, TTT), drawn in the bpb panel at the end of training. Time is the
training clock, which stops during validation. Needs matplotlib (pip install matplotlib), imported
only to draw."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_record import log_lines, parse_fields  # noqa: E402  (one parser for the log format)


@dataclass
class Curves:
    label: str
    train_step: list[int] = field(default_factory=list)
    train_time_s: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    val_time_s: list[float] = field(default_factory=list)  # NaN where the log gave no time
    val_bpb: list[float] = field(default_factory=list)
    # Pass -> val_bpb of the artifact's scoring.
    final_bpb: dict[str, float] = field(default_factory=dict)


FINAL_PASSES = {"flat": "quant_val_bpb", "sliding": "sliding_val_bpb", "TTT": "ttt_val_bpb"}


def read_curves(path: Path) -> Curves:
    """The curves of one log, labelled by its run_id (from `final {json}`) or its file name."""
    curves = Curves(label=path.parent.name if path.name == "train.log" else path.stem)
    for line in log_lines(path):
        event, fields = parse_fields(line)
        if line.startswith("final {"):
            final = json.loads(line[len("final ") :])
            curves.label = final.get("run_id") or curves.label
            curves.final_bpb = {
                name: final[key] for name, key in FINAL_PASSES.items() if final.get(key) is not None
            }
        elif event == "train" and {"step", "loss", "time_ms"} <= fields.keys():
            curves.train_step.append(int(fields["step"].split("/")[0]))
            curves.train_time_s.append(float(fields["time_ms"]) / 1000)
            curves.train_loss.append(float(fields["loss"]))
        elif event == "val" and {"step", "bpb"} <= fields.keys():
            curves.val_step.append(int(fields["step"]))
            curves.val_time_s.append(float(fields.get("train_time_ms", "nan")) / 1000)
            curves.val_bpb.append(float(fields["bpb"]))
    if not curves.train_step and not curves.val_step:
        raise SystemExit(f"error: {path} has no `train step:...` or `val step:...` lines")
    curves.val_time_s = fill_times(curves)
    return curves


def fill_times(curves: Curves) -> list[float]:
    """Val times the log left out, interpolated from (step, time) of the train lines."""
    times = np.array(curves.val_time_s, dtype=float)
    missing = np.isnan(times)
    if missing.any() and curves.train_step:
        steps = np.array([0] + curves.train_step, dtype=float)
        seconds = np.array([0.0] + curves.train_time_s)
        times[missing] = np.interp(np.array(curves.val_step, dtype=float)[missing], steps, seconds)
    return times.tolist()


def plot(all_curves: list[Curves], out: Path, axes_x: list[str], title: str | None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; no display needed
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        raise SystemExit("error: plot_runs.py needs matplotlib: pip install matplotlib") from None
    fig, grid = plt.subplots(len(axes_x), 2, figsize=(12, 4.2 * len(axes_x)), squeeze=False)
    for row, x_kind in zip(grid, axes_x, strict=True):
        for curves in all_curves:
            train_x = curves.train_time_s if x_kind == "time" else curves.train_step
            val_x = curves.val_time_s if x_kind == "time" else curves.val_step
            row[0].plot(train_x, curves.train_loss, label=curves.label, linewidth=1)
            if curves.val_step:
                row[1].plot(val_x, curves.val_bpb, marker="o", markersize=3, label=curves.label)
            end = train_x[-1] if train_x else 0
            for (name, bpb), marker in zip(curves.final_bpb.items(), "sD*", strict=False):
                row[1].plot(
                    [end],
                    [bpb],
                    marker=marker,
                    linestyle="",
                    label=f"{curves.label} {name} {bpb:.4f}",
                )
        xlabel = "training time (s)" if x_kind == "time" else "step"
        row[0].set(xlabel=xlabel, ylabel="train loss (nats/token)", yscale="log")
        # Loss spans ~9 -> ~3 nats: log scale keeps the tail readable; plain labels at 1..9 x 10^k.
        row[0].yaxis.set_major_locator(ticker.LogLocator(subs="all"))
        row[0].yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        row[0].yaxis.set_minor_formatter(ticker.NullFormatter())
        row[1].set(xlabel=xlabel, ylabel="val bpb")
        row[1].ticklabel_format(axis="y", useOffset=False)  # 2.2526, not 0.0006 + 2.252
        for axis in row:
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=Path("runs.png"))
    parser.add_argument(
        "--x", choices=("time", "step", "both"), default="both", help="x axis of the panels"
    )
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    curves = [read_curves(path) for path in args.logs]
    plot(curves, args.out, ["time", "step"] if args.x == "both" else [args.x], args.title)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()

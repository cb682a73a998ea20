"""Turn the logs of seeded runs into a record's submission.json, and test the gain for significance.

Usage:
    python scripts/make_record.py records/track_10min_16mb/2026-05-01_MyIdea/train_seed*.log \
        --name "My idea" --author "Jane Doe" --github-id jdoe --blurb "What changed, in one line" \
        --baseline-bpb 1.0611 [--baseline-loss 2.7409] [--out .../submission.json]

Every number in submission.json comes from the logs: the last `final {json}` line of each log, its
`config {json}`, `versions ...`, `dist ...`, `gpu ...` and `git ...` lines (train_gpt.py writes
them). A field missing from a log is written as null, with a warning. The compliance fields are
computed from those numbers, never typed by hand.

The significance test is the challenge's record bar (the challenge's README): a new record must beat
the current one by at least 0.005 nats (val_loss, per token) with p < 0.01. With per-seed
improvements d_i = baseline_loss - val_loss_i we test H0: mean(d) <= 0.005 against H1: mean(d) >
0.005 with a one-sided one-sample Student t-test, t = (mean(d) - 0.005) / (std(d) / sqrt(n)), df = n
- 1. Without --baseline-loss, the baseline loss is derived from --baseline-bpb through the logs' own
nats-per-bit ratio (val_loss / val_bpb = ln 2 * bytes / tokens), which assumes the same tokenizer
and validation set as the baseline."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TRACK = "10min_16mb"
TRAIN_LIMIT_MS = 600_000  # 10 minutes of training on 8xH100
EVAL_LIMIT_MS = 600_000  # and 10 more for evaluation
ARTIFACT_LIMIT_BYTES = 16_000_000  # decimal megabytes: code + compressed model
MIN_SEEDS = 3
RECORD_MARGIN_NATS = 0.005
RECORD_P_VALUE = 0.01
# Fields copied per seed from the `final {json}` line; a missing one becomes null with a warning.
SEED_FIELDS = (
    "val_loss",
    "val_bpb",
    "bytes_total",
    "bytes_model",
    "bytes_code",
    "steps",
    "train_time_ms",
    "eval_time_ms",
    "prequant_val_bpb",
    "quant_val_bpb",
    "val_tokens",
    "val_bytes",
    "peak_mem_mib",
    "attn_backend",
    "world_size",
    "run_id",
)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------
# Log parsing (plot_runs.py uses it too)
# ----------------------------------------------------------------------------
def parse_fields(line: str) -> tuple[str, dict[str, str]]:
    """`train step:12/100 loss:3.1` -> ("train", {"step": "12/100", "loss": "3.1"}). Leading words
    without a colon form the event ("val ema"); a value keeps any later colons (device:cuda:0)."""
    event, fields = [], {}
    for word in line.split():
        key, sep, value = word.partition(":")
        if sep and key:
            fields[key] = value
        elif not fields:
            event.append(word)
    return " ".join(event), fields


def log_lines(path: Path) -> list[str]:
    """The log's lines without the embedded source code (between `source ...` and `config {`),
    which could otherwise contain lines that look like events."""
    lines, in_source = [], False
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("source ") and not lines:
            in_source = True
            continue
        if in_source and not line.startswith("config {"):
            continue
        in_source = False
        lines.append(line)
    return lines


@dataclass
class RunLog:
    path: Path
    final: dict
    config: dict = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    gpu: str | None = None
    git_commit: str | None = None


def read_run_log(path: Path) -> RunLog:
    final: dict | None = None
    run = RunLog(path=path, final={})
    for line in log_lines(path):
        event, fields = parse_fields(line)
        if line.startswith("final {"):
            final = json.loads(line[len("final ") :])
        elif line.startswith("config {"):
            run.config = json.loads(line[len("config ") :])
        elif event == "versions":
            run.versions = fields
        elif event == "gpu":
            run.gpu = fields.get("name") or line[len("gpu ") :].strip()
        elif event == "git":
            run.git_commit = fields.get("commit")
    if final is None:
        raise SystemExit(f"error: {path} has no `final {{json}}` line (did the run finish?)")
    run.final = final
    return run


# ----------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for a single value."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function, evaluated by the modified Lentz method;
    converges fast for x < (a + 1) / (a + b + 2)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 1000):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for coefficient in (even, odd):
            d = 1.0 + coefficient * d
            c = 1.0 + coefficient / c
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = c if abs(c) > tiny else tiny
            result *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return result


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    # Symmetry I_x(a, b) = 1 - I_{1-x}(b, a) keeps the continued fraction in its fast region.
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom: the two tails together are
    I_{df/(df+t^2)}(df/2, 1/2)."""
    two_tails = regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return two_tails / 2.0 if t > 0 else 1.0 - two_tails / 2.0


def one_sided_test(improvements: list[float], margin: float) -> dict:
    """H1: mean(improvements) > margin, one-sample one-sided t-test."""
    n = len(improvements)
    mean, std = mean_std(improvements)
    if std is None:
        return {"n": n, "mean": mean, "std": None, "t": None, "df": 0, "p_value": None}
    if std == 0.0:  # every seed identical: the sign decides
        return {
            "n": n,
            "mean": mean,
            "std": 0.0,
            "t": None,
            "df": n - 1,
            "p_value": 0.0 if mean > margin else 1.0,
        }
    t = (mean - margin) / (std / math.sqrt(n))
    return {
        "n": n,
        "mean": mean,
        "std": std,
        "t": t,
        "df": n - 1,
        "p_value": student_t_sf(t, n - 1),
    }


def compare_to_baseline(
    runs: list[RunLog], baseline_bpb: float | None, baseline_loss: float | None
) -> dict | None:
    """Deltas against the baseline (positive = better) and the record-bar test."""
    losses = [r.final.get("val_loss") for r in runs]
    bpbs = [r.final.get("val_bpb") for r in runs]
    if baseline_bpb is None and baseline_loss is None:
        return None
    if None in losses or None in bpbs:
        warn("val_loss or val_bpb missing from a final line: no comparison")
        return None
    loss_source = "given"
    if baseline_loss is None:
        nats_per_bit = mean_std([loss / bpb for loss, bpb in zip(losses, bpbs, strict=True)])[0]
        baseline_loss, loss_source = baseline_bpb * nats_per_bit, "from_bpb"
    improvements = [baseline_loss - loss for loss in losses]
    test = one_sided_test(improvements, RECORD_MARGIN_NATS)
    p = test["p_value"]
    return {
        "baseline_bpb": baseline_bpb,
        "baseline_loss": baseline_loss,
        "baseline_loss_source": loss_source,
        "delta_nats": test["mean"],
        "delta_bpb": None if baseline_bpb is None else baseline_bpb - mean_std(bpbs)[0],
        "margin_nats": RECORD_MARGIN_NATS,
        "t": test["t"],
        "df": test["df"],
        "p_value": p,
        "p_value_any_gain": one_sided_test(improvements, 0.0)["p_value"],
        "clears_record_bar": p is not None
        and test["mean"] > RECORD_MARGIN_NATS
        and p < RECORD_P_VALUE,
    }


# ----------------------------------------------------------------------------
# submission.json
# ----------------------------------------------------------------------------
def seed_result(run: RunLog) -> dict:
    result = {}
    for key in SEED_FIELDS:
        if run.final.get(key) is None:
            warn(f"{run.path.name}: final line has no {key}; null in submission.json")
        result[key] = run.final.get(key)
    steps, train_ms = result["steps"], result["train_time_ms"]
    result["step_avg_ms"] = round(train_ms / steps, 2) if steps and train_ms is not None else None
    result["log"] = run.path.name
    return result


def summarize(results: list[dict], key: str) -> tuple[float | None, float | None]:
    values = [r[key] for r in results]
    if not values or None in values:
        return None, None
    return mean_std(values)


def max_of(results: list[dict], key: str) -> float | None:
    values = [r[key] for r in results]
    return None if not values or None in values else max(values)


def all_within(results: list[dict], key: str, limit: float) -> bool | None:
    values = [r[key] for r in results]
    return None if None in values else all(v <= limit for v in values)


def one_value(runs: list[RunLog], what: str, getter: Callable[[RunLog], object]) -> str | None:
    """The value all logs share (e.g. the torch version); warns and joins them if they differ."""
    values = sorted({str(getter(r)) for r in runs if getter(r) is not None})
    if len(values) > 1:
        warn(f"logs disagree on {what}: {values}")
    return ", ".join(values) if values else None


def hardware(run: RunLog) -> str | None:
    world = run.final.get("world_size")
    if run.gpu:
        return f"{world}x{run.gpu}" if world else run.gpu
    return "cpu" if run.versions.get("cuda") == "none" else None


def check_same_config(runs: list[RunLog]) -> None:
    """Seeds of one record must differ only in seed and run id."""

    def stripped(run: RunLog) -> dict:
        return {
            k: v for k, v in run.config.items() if k.lower() not in ("seed", "run_id", "out_dir")
        }

    for run in runs[1:]:
        if stripped(run) != stripped(runs[0]):
            diff = sorted(
                k
                for k in set(stripped(run)) | set(stripped(runs[0]))
                if stripped(run).get(k) != stripped(runs[0]).get(k)
            )
            warn(f"{run.path.name} and {runs[0].path.name} ran different configs: {diff}")


def build_submission(runs: list[RunLog], args: argparse.Namespace) -> dict:
    check_same_config(runs)
    results = [seed_result(run) for run in runs]
    seeds = [run.final.get("seed", run.config.get("seed")) for run in runs]
    if len(set(seeds)) < len(seeds):
        warn(f"repeated seeds {seeds}")
    loss_mean, loss_std = summarize(results, "val_loss")
    bpb_mean, bpb_std = summarize(results, "val_bpb")
    comparison = compare_to_baseline(runs, args.baseline_bpb, args.baseline_loss)
    return {
        "author": args.author,
        "github_id": args.github_id,
        "name": args.name,
        "blurb": args.blurb,
        "date": args.date,
        "track": TRACK,
        "val_loss": loss_mean,
        "val_bpb": bpb_mean,
        "val_loss_std": loss_std,
        "val_bpb_std": bpb_std,
        "seeds": seeds,
        "seed_results": {str(seed): result for seed, result in zip(seeds, results, strict=True)},
        "bytes_total": max_of(
            results, "bytes_total"
        ),  # the largest artifact is the one the limit binds
        "bytes_code": max_of(results, "bytes_code"),
        "artifact_bytes_mean": summarize(results, "bytes_total")[0],
        "artifact_bytes_max": max_of(results, "bytes_total"),
        "train_steps_mean": summarize(results, "steps")[0],
        "step_avg_ms_mean": summarize(results, "step_avg_ms")[0],
        "train_time_ms_max": max_of(results, "train_time_ms"),
        "eval_time_ms_max": max_of(results, "eval_time_ms"),
        "hardware": one_value(runs, "hardware", hardware),
        "python_version": one_value(runs, "python version", lambda r: r.versions.get("python")),
        "pytorch_version": one_value(runs, "torch version", lambda r: r.versions.get("torch")),
        "cuda_version": one_value(runs, "CUDA version", lambda r: r.versions.get("cuda")),
        "git_commit": one_value(runs, "git commit", lambda r: r.git_commit),
        "comparison_baseline_bpb": args.baseline_bpb,
        "delta_vs_baseline_bpb": None if comparison is None else comparison["delta_bpb"],
        "delta_vs_baseline_nats": None if comparison is None else comparison["delta_nats"],
        "significance": comparison,
        "compliance": {
            "train_under_600s": all_within(results, "train_time_ms", TRAIN_LIMIT_MS),
            "artifact_under_16mb": all_within(results, "bytes_total", ARTIFACT_LIMIT_BYTES),
            "eval_under_600s": all_within(results, "eval_time_ms", EVAL_LIMIT_MS),
            "three_seeds": len({s for s in seeds if s is not None}) >= MIN_SEEDS,
        },
    }


def report(submission: dict) -> str:
    """Human-readable summary printed after writing submission.json."""

    def fmt(value: float | None, digits: int = 5) -> str:
        return "null" if value is None else f"{value:.{digits}f}"

    lines = [
        f"seeds: {len(submission['seeds'])} {submission['seeds']}",
        f"val_bpb: mean {fmt(submission['val_bpb'])} std {fmt(submission['val_bpb_std'])}   "
        f"val_loss: mean {fmt(submission['val_loss'])} std {fmt(submission['val_loss_std'])}",
        "compliance: " + " ".join(f"{k}={v}" for k, v in submission["compliance"].items()),
    ]
    sig = submission["significance"]
    if sig is not None:
        lines += [
            f"baseline: val_loss {fmt(sig['baseline_loss'])} ({sig['baseline_loss_source']}), "
            f"val_bpb {fmt(sig['baseline_bpb'])}",
            f"delta (positive = better): {fmt(sig['delta_nats'])} nats, "
            f"{fmt(sig['delta_bpb'])} bpb",
            f"one-sided t-test, H1: delta > {sig['margin_nats']} nats: "
            f"t={fmt(sig['t'], 3)} df={sig['df']} "
            f"p={fmt(sig['p_value'], 4)} (p for any gain: {fmt(sig['p_value_any_gain'], 4)})"
            + (" (a p-value needs >= 2 seeds)" if sig["df"] == 0 else ""),
            f"record bar (>= {RECORD_MARGIN_NATS} nats at p < {RECORD_P_VALUE}): "
            + ("CLEARED" if sig["clears_record_bar"] else "not cleared"),
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "logs", type=Path, nargs="+", help="one log per seed (train.log or tee'd stdout)"
    )
    parser.add_argument("--out", type=Path, default=None, help="default: beside the first log")
    parser.add_argument("--name", default=None)
    parser.add_argument("--author", default=None)
    parser.add_argument("--github-id", default=None)
    parser.add_argument("--blurb", default=None)
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument(
        "--baseline-bpb", type=float, default=None, help="score to beat (current record)"
    )
    parser.add_argument(
        "--baseline-loss", type=float, default=None, help="its val_loss in nats, if known"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    runs = [read_run_log(path) for path in args.logs]
    submission = build_submission(runs, args)
    out = args.out or args.logs[0].parent / "submission.json"
    out.write_text(json.dumps(submission, indent=2) + "\n", encoding="utf-8")
    print(report(submission))
    print(f"wrote {out}")
    return submission


if __name__ == "__main__":
    main()

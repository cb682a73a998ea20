"""Two GPUs against one: the helpers of scripts/two_gpu.sh, for any number of GPUs or CPU ranks.

steps   train_gpt.py's training only (no artifact, no evaluation), each of the first --log-steps
        steps logged; optionally a torch.profiler window (--profile A:B: training steps A..B-1 on
        each rank) logged as `profile rank:R steps:... wall_ms busy_ms idle_ms nccl_ms
        nccl_exposed_ms` (idle: no kernel running, e.g. the per-step host sync; exposed: a
        collective kernel with no other kernel beside it); and faults for the robustness checks
        (--dist-timeout, --hang-at: rank 1 sleeps in that optimizer step). Run like train_gpt.py:
          torchrun --standalone --nproc_per_node=2 scripts/two_gpu.py steps --log-steps 30
report  compares logs of train_gpt.py (or of `steps`), the first against each later one:
          python scripts/two_gpu.py report runs/a/train.log runs/b/train.log [--json out.json]
        Per run: world size, loop step, tok/s per GPU with looping off and on (medians of the
        lines of single steps; the first two of each mode and profiled steps left out), the slice
        check, the final scores. Against the first run: the largest relative difference of the
        losses of the steps both logged, and of each score.
dumps   compares the EVAL_DUMP_PATH files (per-target nll and bytes, in stream order) of two
        evaluations: every target scored once in both, and how far apart.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

SCORES = ("val_loss", "val_bpb", "quant_val_bpb", "sliding_val_bpb", "ttt_val_bpb", "live_val_bpb")
SCORES += ("prequant_val_bpb",)
SETTLE_STEPS = 2  # steps of each recurrence mode left out of the speed medians (allocator, caches)


# ----------------------------------------------------------------------------- steps -------------
def train_only(env: dict[str, str]) -> dict[str, object]:
    """train_gpt.main()'s stages, cut after training: speed and loss runs need no artifact or
    evaluation."""
    since_start = tg.Stopwatch()
    hp = tg.Hyperparameters.from_env(env)
    dist_env = tg.setup_distributed(env)
    tg.torch.backends.cuda.matmul.allow_tf32 = tg.torch.backends.cudnn.allow_tf32 = True
    backends = tg.resolve_backends(hp.train.attn_backend, dist_env.device)
    geo = tg.batch_geometry(hp, dist_env.world_size, backends[0])
    tg.check_data(hp, training=True)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    run_id = hp.run_id or tg.broadcast_object(f"{stamp}_seed{hp.seed}", dist_env)
    out_dir = tg.prepare_out_dir(Path(hp.out_dir or f"runs/{run_id}"), hp.overwrite, dist_env)
    log = tg.Logger(out_dir / "train.log", dist_env.is_main)
    tg.log_run_header(log, hp, dist_env, env)
    log.log("geometry", **geo.log_fields())
    if isinstance(tg.train_step, ProfileWindow):
        tg.train_step.log = log
    try:
        _, result = tg.train_model(hp, dist_env, geo, backends, log=log, since_start=since_start)
        final = dict(
            steps=result.steps,
            train_time_ms=round(result.train_time_ms),
            world_size=dist_env.world_size,
            run_id=run_id,
        )
        log.line("final " + json.dumps(final))
    except Exception as exc:  # the log ends with the reason, as train_gpt.main()'s does
        log.line(f"error {type(exc).__name__}: {exc}")
        raise
    finally:
        log.close()
    if tg.dist.is_initialized():
        tg.dist.destroy_process_group()
    return final


def merge_intervals(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, disjoint union of [start, end) intervals."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def covered(spans: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in merge_intervals(spans))


def kernel_times(kernels: list[tuple[str, float, float]], wall: float) -> dict[str, float]:
    """kernels: (name, start, end) of every device kernel in a window of `wall` (same unit). Busy:
    the union of all kernels; nccl: of the collective kernels; exposed: the part of nccl with no
    other kernel running (what overlapping communication with compute could hide)."""
    nccl = [(s, e) for name, s, e in kernels if "nccl" in name.lower()]
    other = [(s, e) for name, s, e in kernels if "nccl" not in name.lower()]
    busy = covered(nccl + other)
    exposed = busy - covered(other)
    return dict(wall=wall, busy=busy, idle=wall - busy, nccl=covered(nccl), nccl_exposed=exposed)


class ProfileWindow:
    """Wraps train_gpt.train_step: profiles training steps [first, last) (0-based: the log's steps
    first+1..last; warmup steps pass step 0) and reports kernel_times. Each rank prints its line;
    rank 0's also goes to train.log (`log`, set once main has made the run's logger). Device
    kernels only: CPU ops would add seconds of post-processing per step."""

    def __init__(self, first: int, last: int):
        assert 1 <= first < last, "--profile A:B needs 1 <= A < B"
        self.first, self.last, self.prof, self.t0 = first, last, None, 0.0
        self.real_step, self.log = tg.train_step, None

    def __call__(
        self, tr: tg.Trainer, batches: list[tg.Batch], *, looping: bool, lr_mult: float, step: int
    ) -> object:
        import torch.profiler as tp
        from torch.autograd import DeviceType

        if step == self.first:
            cuda = tr.dist.device.type == "cuda"
            activities = [tp.ProfilerActivity.CUDA if cuda else tp.ProfilerActivity.CPU]
            tg.sync(tr.dist.device)
            self.prof, self.t0 = tp.profile(activities=activities), time.perf_counter()
            self.prof.__enter__()
        loss = self.real_step(tr, batches, looping=looping, lr_mult=lr_mult, step=step)
        if self.prof is not None and step == self.last - 1:
            tg.sync(tr.dist.device)
            wall_us = 1e6 * (time.perf_counter() - self.t0)
            self.prof.__exit__(None, None, None)
            kernels = [
                (e.name, e.time_range.start, e.time_range.end)
                for e in self.prof.events()
                if e.device_type == DeviceType.CUDA
            ]
            times = kernel_times(kernels, wall_us)
            fields = " ".join(f"{k}_ms:{v / 1000:.1f}" for k, v in times.items())
            where = f"rank:{tr.dist.rank} steps:{self.first + 1}-{self.last} kernels:{len(kernels)}"
            line = f"profile {where} {fields}"
            print(line, flush=True)
            if self.log is not None:
                self.log.line(line, console=False)
            self.prof = None
        return loss


def steps_main(args: argparse.Namespace) -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    tg.LOG_FIRST_STEPS = args.log_steps
    tg.DIST_TIMEOUT_S = args.dist_timeout or tg.DIST_TIMEOUT_S
    if args.profile:
        tg.train_step = ProfileWindow(*map(int, args.profile.split(":")))
    if args.hang_at:
        tg.optimizer_step = hang_rank1(tg.optimizer_step, args.hang_at)
    record(train_only)(dict(os.environ))


def hang_rank1(step_fn: object, at: int) -> object:
    """optimizer_step that, on rank 1, sleeps forever in its at-th call (warmup steps count)."""
    calls = [0]

    def hanging(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        if calls[0] == at and os.environ.get("RANK") == "1":
            print(f"rank 1 hangs in optimizer step {at} at {time.time():.3f}", flush=True)
            time.sleep(10**6)
        return step_fn(*args, **kwargs)

    return hanging


# ----------------------------------------------------------------------------- report ------------
def parse_log(path: Path) -> dict[str, object]:
    text = path.read_text(errors="replace")
    world = int(re.search(r"^dist world_size:(\d+)", text, re.M)[1])
    start = re.search(r"^train start .*tokens_per_step:(\d+)", text, re.M)  # none: EVAL_ARTIFACT
    pattern = r"^train step:(\d+)/\d+ loss:(\S+) time_ms:\S+ step_ms:(\S+)"
    steps = {
        int(m[1]): dict(loss=float(m[2]), step_ms=float(m[3]))
        for m in re.finditer(pattern, text, re.M)
    }
    logged = sorted(steps)
    for prev, step in zip([0, *logged], logged, strict=False):  # one step: right after a line
        steps[step]["single"] = step - prev == 1
    loop = re.search(r"^loop enabled step:(\d+)", text, re.M)  # k: looped from log step k + 1
    profiled = {
        s
        for a, b in re.findall(r"^profile rank:0 steps:(\d+)-(\d+)", text, re.M)
        for s in range(int(a), int(b) + 1)
    }
    final = re.search(r"^final (\{.*\})$", text, re.M)
    slices = re.search(r"^data rank_slices:.*$", text, re.M)  # `^`: not in the logged source
    return dict(
        path=str(path),
        world=world,
        tokens=int(start[1]) if start else 0,
        steps=steps,
        profiled=profiled,
        loop_step=int(loop[1]) if loop else None,
        final=json.loads(final[1]) if final else {},
        slices=slices[0] if slices else None,
    )


def speeds(run: dict[str, object]) -> dict[str, float | None]:
    """tok/s per GPU, looping off and on: medians over single-step lines (settle and profiled
    steps left out); None where a mode has no such line."""
    loop = run["loop_step"] if run["loop_step"] is not None else 1 << 30
    ranges = {"off": (1, loop), "on": (loop + 1, 1 << 31)}  # log steps; looping from loop + 1
    out: dict[str, float | None] = {}
    for mode, (first, last) in ranges.items():
        ms = [
            v["step_ms"]
            for s, v in run["steps"].items()
            if first + SETTLE_STEPS <= s <= last and v["single"] and s not in run["profiled"]
        ]
        out[mode] = run["tokens"] / statistics.median(ms) * 1000 / run["world"] if ms else None
    return out


def compare(base: dict[str, object], other: dict[str, object]) -> dict[str, object]:
    common = sorted(base["steps"].keys() & other["steps"].keys())
    rel = [abs(other["steps"][s]["loss"] / base["steps"][s]["loss"] - 1) for s in common]
    scores = {
        k: abs(other["final"][k] / base["final"][k] - 1)
        for k in SCORES
        if k in base["final"] and k in other["final"]
    }
    mine, theirs = speeds(other), speeds(base)
    return dict(
        common_steps=len(common),
        max_loss_rel_diff=max(rel, default=None),
        same_loop_step=base["loop_step"] == other["loop_step"],
        score_rel_diff=scores,
        tok_s_per_gpu_ratio={
            m: mine[m] / theirs[m] if mine[m] and theirs[m] else None for m in mine
        },
    )


def report_main(args: argparse.Namespace) -> dict[str, object]:
    runs = [parse_log(Path(p)) for p in args.logs]
    result = dict(runs=[], comparisons=[])
    for run in runs:
        summary = dict(
            path=run["path"],
            world_size=run["world"],
            loop_step=run["loop_step"],
            tok_s_per_gpu=speeds(run),
            slice_check=run["slices"],
            first_losses=[run["steps"][s]["loss"] for s in sorted(run["steps"])][:30],
            scores={k: run["final"][k] for k in SCORES if k in run["final"]},
            eval_time_ms=run["final"].get("eval_time_ms"),
            steps=run["final"].get("steps"),
        )
        result["runs"].append(summary)
        print(json.dumps(summary))
    for run in runs[1:]:
        comparison = dict(base=runs[0]["path"], other=run["path"], **compare(runs[0], run))
        result["comparisons"].append(comparison)
        print(json.dumps(comparison))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


def dumps_main(args: argparse.Namespace) -> dict[str, object]:
    a, b = (np.load(p) for p in args.dumps)
    same_targets = a["nll"].shape == b["nll"].shape and np.array_equal(a["bytes"], b["bytes"])
    diff = np.abs(a["nll"].astype(np.float64) - b["nll"]) if same_targets else None
    out = dict(
        targets=[int(a["nll"].size), int(b["nll"].size)],
        same_targets_and_bytes=bool(same_targets),
        nll_max_abs_diff=float(diff.max()) if diff is not None else None,
        bpb=[
            float(d["nll"].astype(np.float64).sum() / np.log(2) / d["bytes"].sum()) for d in (a, b)
        ],
    )
    print(json.dumps(out))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    steps = sub.add_parser("steps", help="training only, every step logged")
    steps.add_argument("--log-steps", type=int, default=30, help="log each of the first N steps")
    steps.add_argument("--profile", default="", help="A:B, profile training steps A..B-1 (A >= 1)")
    steps.add_argument(
        "--dist-timeout", type=float, default=0.0, help="DIST_TIMEOUT_S instead of 300"
    )
    steps.add_argument(
        "--hang-at", type=int, default=0, help="rank 1 hangs in this optimizer step (1-based)"
    )
    report = sub.add_parser("report", help="compare train.log files, the first against the others")
    report.add_argument("logs", nargs="+", type=Path)
    report.add_argument("--json", type=Path, default=None)
    dumps = sub.add_parser("dumps", help="compare two EVAL_DUMP_PATH files")
    dumps.add_argument("dumps", nargs=2, type=Path)
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    sys.argv[1:] = []  # train_gpt reads its settings from the environment only
    {"steps": steps_main, "report": report_main, "dumps": dumps_main}[arguments.command](arguments)

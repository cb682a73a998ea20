"""Training-speed benchmark of train_gpt.py on one GPU (or a tiny smoke run on the CPU).

At a given TRAIN_BATCH_TOKENS (default 786,432 in 8 micro-steps of 48 x 2,048: one rank of the 8-GPU
record) it measures
  - tokens per second with depth recurrence off and on (median of the timed steps, after compile),
  - peak memory,
  - process start -> first timed step, cold (empty compiler caches) and warm (the cold run's
    caches), each in a fresh process that compiles both recurrence modes as train_gpt.train does,
  - MFU: model FLOPs per second over this GPU's measured bf16 matmul rate (8192^3 on random data),
  - a CUDA-time breakdown of one looped step: attention, matmul, fused elementwise (inductor's
    Triton kernels and ATen's), optimizer (every kernel of the optimizer step), other (copies,
    memsets),
and, with --data, the losses of the first --loss-steps steps on real shards (to compare kernels).

Data: a synthetic stream (uniform random tokens) whose documents have lognormal lengths of mean
--doc-len tokens: 800 is FineWeb-like, 4000 the Wikipedia testbed. Any train_gpt setting can be
given as an environment variable (ATTN_BACKEND=flex, NUM_LOOPS=...), as for train_gpt.py itself.

  python scripts/bench.py --out records/speed/h100.json           # the record shape on one GPU
  python scripts/bench.py --tiny                                   # a seconds-long CPU smoke run
It prints a table and writes JSON (--out).
"""

from __future__ import annotations

import time

T_PROCESS = time.time()  # before importing torch: the startup probe times the whole process

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

TINY = dict(
    VOCAB_SIZE="512",
    NUM_LAYERS="4",
    MODEL_DIM="64",
    NUM_HEADS="4",
    NUM_KV_HEADS="2",
    LOOP_START="1",
    LOOP_END="2",
    PARALLEL_START_LAYER="3",
    TRAIN_SEQ_LEN="128",
    TRAIN_BATCH_TOKENS="2048",
    GRAD_ACCUM_STEPS="2",
    WARMUP_STEPS="1",
)
CATEGORIES = ("attention", "matmul", "fused elementwise", "optimizer", "other")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--batch-tokens", type=int, default=None, help="TRAIN_BATCH_TOKENS (default: the record's)"
    )
    p.add_argument("--steps", type=int, default=8, help="timed steps per recurrence mode")
    p.add_argument(
        "--doc-len", type=int, default=800, help="mean synthetic document length in tokens"
    )
    p.add_argument(
        "--data", type=Path, default=None, help="a shard folder: also log the first losses on it"
    )
    p.add_argument("--loss-steps", type=int, default=50, help="steps whose losses --data records")
    p.add_argument(
        "--no-startup", action="store_true", help="skip the cold and warm start-up probes"
    )
    p.add_argument(
        "--tiny", action="store_true", help="a tiny model on the CPU (a smoke test of this script)"
    )
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    # Internal: child mode.
    p.add_argument("--probe-startup", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> dict[str, str]:
    """The train_gpt settings of this benchmark: the environment, then --tiny and --batch-tokens."""
    env = {k: v for k, v in os.environ.items() if k.isupper()}
    if args.tiny:
        env = {**TINY, "COMPILE": "0", **env}
    if args.batch_tokens:
        env["TRAIN_BATCH_TOKENS"] = str(args.batch_tokens)
    return env


def synthetic_shard(folder: Path, vocab: int, tokens: int, doc_len: int, seed: int = 0) -> Path:
    """One train shard of random tokens in documents of lognormal length (mean doc_len, sigma 1)."""
    rng = np.random.default_rng(seed)
    stream = rng.integers(2, vocab, tokens).astype(np.uint16)
    lengths = (
        rng.lognormal(np.log(doc_len) - 0.5, 1.0, tokens // max(1, doc_len // 4)).astype(np.int64)
        + 1
    )
    bounds = np.cumsum(lengths)
    stream[np.concatenate([[0], bounds[bounds < tokens]])] = tg.BOS_ID
    tg.write_shard(folder / "fineweb_train_000000.bin", stream)
    return folder


@dataclasses.dataclass
class Bench:
    """A model, its optimizers and a loader, built as train_gpt.train_model builds them."""

    hp: tg.Hyperparameters
    trainer: tg.Trainer
    loader: tg.TrainLoader
    backend: str

    @classmethod
    def build(cls, env: dict[str, str], data: Path) -> Bench:
        hp = tg.Hyperparameters.from_env(env)
        dist_env = tg.setup_distributed({})
        backends = tg.resolve_backends(hp.train.attn_backend, dist_env.device)
        geo = tg.batch_geometry(hp, 1, backends[0])
        compiled = tg.compile_enabled(hp.train, dist_env.device)
        torch.manual_seed(hp.seed)
        base = tg.GPT(hp.model, backends).to(dist_env.device)
        ns = tg.maybe_compile(tg.newton_schulz, compiled)
        opts = tg.build_optimizers(base, hp.train, dist_env, ns)
        model = tg.maybe_compile(base, compiled)
        trainer = tg.Trainer(model, base, opts, hp.train, dist_env, geo.accum)
        loader = tg.TrainLoader(
            tg.shard_paths(data, "train"),
            row_tokens=geo.row,
            seq_len=hp.train.train_seq_len,
            accum=geo.accum,
            dist_env=dist_env,
            seed=hp.seed,
        )
        return cls(hp, trainer, loader, backends[0])

    def step(self, looping: bool, step: int = 0) -> float:
        loss = tg.train_step(
            self.trainer, self.loader.next_batches(), looping=looping, lr_mult=1.0, step=step
        )
        tg.sync(self.trainer.dist.device)
        return loss.item()

    def timed_steps(self, looping: bool, n: int) -> list[float]:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.step(looping)
            times.append(time.perf_counter() - t0)
        return times


def probe_startup(args: argparse.Namespace) -> None:
    """Child mode: build, compile both recurrence modes (warmup_and_restore), one timed step; print
    seconds."""
    bench = Bench.build(settings(args), args.probe_startup)
    tg.warmup_and_restore(bench.trainer, bench.loader)
    bench.step(looping=False)
    print(json.dumps({"first_step_s": time.time() - T_PROCESS}))


def startup_seconds(args: argparse.Namespace, data: Path, cache: Path) -> float:
    """Process start -> first timed step of a fresh process with its compiler caches in `cache`."""
    env = dict(
        os.environ,
        TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
        TRITON_CACHE_DIR=str(cache / "triton"),
        FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED="1",
        FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=str(cache / "fa4"),
    )
    argv = [
        sys.executable,
        __file__,
        "--probe-startup",
        str(data),
        *(["--tiny"] if args.tiny else []),
    ]
    argv += ["--batch-tokens", str(args.batch_tokens)] if args.batch_tokens else []
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"start-up probe failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["first_step_s"]


def matmul_tflops(device: torch.device) -> float:
    """Measured bf16 matmul rate (random data; 8192^3 on a GPU, 1024^3 on a CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    tg.sync(device)
    reps, t0 = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    tg.sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def flops_per_token(cfg: tg.ModelConfig, looping: bool, mean_context: float) -> float:
    """Training FLOPs per token: 6 x (the matmul weights a token passes through + the tied head) + 3
    x the attention products (QK^T and PV, 2 x 2 x H x D per attended key) at the stream's mean
    causal context."""
    enc, dec = tg.layer_schedule(cfg, looping)
    d, kv = cfg.model_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = 2 * d * d + 2 * d * kv + 2 * d * int(cfg.mlp_mult * d)
    layers = len(enc) + len(dec)
    return 6 * (layers * per_layer + d * cfg.vocab_size) + 3 * layers * 4 * d * mean_context


def mean_context(batches: list[tg.Batch]) -> float:
    """Keys a query attends to on average, causal inside pieces: sum n(n+1)/2 / sum n over the
    pieces."""
    lengths = np.concatenate(
        [np.diff(np.flatnonzero(np.append(b.starts.numpy().ravel(), True))) for b in batches]
    )
    return float((lengths * (lengths + 1) / 2).sum() / lengths.sum())


def classify(kernel: str) -> str:
    name = kernel.lower()
    if any(
        k in name for k in ("flash", "fmha", "sdpa", "attention", "attn", "flex")
    ) or name.startswith("triton_tem"):
        return "attention"
    if any(
        k in name
        for k in ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "gemv", "splitk")
    ):
        return "matmul"
    if name.startswith("triton_") or any(
        k in name for k in ("elementwise", "reduce", "vectorized", "foreach")
    ):
        return "fused elementwise"
    return "other"


def cuda_ms(fn: object) -> dict[str, float]:
    """CUDA kernel time of fn() by category (ms)."""
    activity = torch.profiler.ProfilerActivity.CUDA
    with torch.profiler.profile(activities=[activity]) as prof:
        fn()
        torch.cuda.synchronize()
    out = dict.fromkeys(CATEGORIES[:3] + ("other",), 0.0)
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out[classify(e.key)] += getattr(e, "self_device_time_total", 0.0) / 1000
    return out


def breakdown(bench: Bench) -> dict[str, float]:
    """CUDA time of one looped step by category (forward/backward apart from the optimizer)."""
    tr, batches = bench.trainer, bench.loader.next_batches()

    def forward_backward() -> None:
        for batch in batches:
            (
                tg.forward_nll(tr.model, batch, looping=True, device=tr.dist.device).mean()
                / tr.accum
            ).backward()

    parts = cuda_ms(forward_backward)
    parts["optimizer"] = sum(
        cuda_ms(lambda: tg.optimizer_step(tr.opts, tr.cfg.grad_clip_norm)).values()
    )
    tr.base_model.zero_grad(set_to_none=True)
    return {k: round(parts[k], 1) for k in CATEGORIES}


def real_losses(args: argparse.Namespace) -> list[float]:
    """The first --loss-steps losses (looping off, LR 1) on the shards of --data, from the seeded
    model."""
    bench = Bench.build(settings(args), args.data)
    return [round(bench.step(looping=False, step=i), 5) for i in range(args.loss_steps)]


def measure(args: argparse.Namespace, data: Path) -> dict[str, object]:
    env = settings(args)
    bench = Bench.build(env, data)
    device, cfg = bench.trainer.dist.device, bench.hp.model
    t0 = time.perf_counter()
    tg.warmup_and_restore(bench.trainer, bench.loader)
    result: dict[str, object] = {"compile_both_modes_s": round(time.perf_counter() - t0, 1)}
    print(f"bench compiled both modes in {result['compile_both_modes_s']} s", flush=True)
    context = mean_context(bench.loader.next_batches())
    rate = matmul_tflops(device)
    tokens = bench.hp.train.train_batch_tokens
    for looping, key in ((False, "off"), (True, "on")):
        times = bench.timed_steps(looping, args.steps)
        step_s = statistics.median(times)
        # The first shows leftover compiles.
        result[f"step_ms_looping_{key}"] = [round(1000 * t, 1) for t in times]
        result[f"ms_per_step_looping_{key}"] = round(1000 * step_s, 1)
        result[f"tok_s_looping_{key}"] = round(tokens / step_s)
        result[f"mfu_looping_{key}"] = round(
            tokens / step_s * flops_per_token(cfg, looping, context) / 1e12 / rate, 4
        )
        print(
            f"bench looping:{key} ms_per_step:{1000 * step_s:.1f} tok_s:{tokens / step_s:,.0f}",
            flush=True,
        )
    if device.type == "cuda":
        result["cuda_ms_by_category_looped_step"] = breakdown(bench)
    result.update(
        peak_mem_mib=round(tg.peak_memory_mib(device)),
        matmul_tflops=round(rate, 1),
        mean_attention_context=round(context, 1),
        attn_backend=bench.backend,
    )
    bench.loader.close()
    return result


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    if args.probe_startup:
        return probe_startup(args)
    env = settings(args)
    hp = tg.Hyperparameters.from_env(env)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        # Warmup, timed, breakdown and spare steps.
        steps = 2 * (hp.train.warmup_steps + args.steps) + 8
        data = synthetic_shard(
            Path(tmp),
            hp.model.vocab_size,
            max(steps * hp.train.train_batch_tokens, 1 << 16),
            args.doc_len,
        )
        result = {
            "gpu": gpu,
            "torch": torch.__version__,
            "train_batch_tokens": hp.train.train_batch_tokens,
            "doc_len": args.doc_len,
            "overrides": {k: str(v) for k, v in hp.overrides().items()},
        }
        if not args.no_startup:
            cache = Path(tmp) / "cache"
            for key in ("first_step_s_cold", "first_step_s_warm"):
                result[key] = round(startup_seconds(args, data, cache), 1)
                print(f"bench {key}:{result[key]}", flush=True)
        result.update(measure(args, data))
    if args.data:
        result["losses"] = real_losses(args)
    print_table(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def print_table(result: dict[str, object]) -> None:
    print(
        f"bench gpu:{result['gpu']} attn:{result['attn_backend']} "
        f"tokens/step:{result['train_batch_tokens']:,} doc_len:{result['doc_len']}"
    )
    for key in (
        "tok_s_looping_off",
        "tok_s_looping_on",
        "ms_per_step_looping_off",
        "ms_per_step_looping_on",
        "mfu_looping_off",
        "mfu_looping_on",
        "peak_mem_mib",
        "compile_both_modes_s",
        "first_step_s_cold",
        "first_step_s_warm",
        "matmul_tflops",
        "mean_attention_context",
    ):
        if key in result:
            print(f"  {key:<28}{result[key]:>14,}")
    for category, ms in result.get("cuda_ms_by_category_looped_step", {}).items():
        print(f"  cuda ms, {category:<19}{ms:>14,}")


if __name__ == "__main__":
    main()

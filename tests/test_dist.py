"""Distributed training on CPU: two gloo processes (launched like torchrun: RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment) reproduce the single-process run and the
single-process Muon."""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL

import train_gpt as tg

ROOT = Path(tg.__file__).resolve().parent
CONFIG_NAMES = set(tg.Hyperparameters().flat())
MUON_SHAPES = [(16, 8)] * 3 + [(8, 24)] * 2 + [(24, 8)]  # odd counts: shards are padded
TINY = tg.ModelConfig(vocab_size=512, **TINY_MODEL)
# Measured on CPU gloo: 1 and 2 ranks bit-identical in all three modes (two rows per chunk, one per
# rank); 1e-9 leaves room only for summation order. The old rank-sliced rows differed by 6e-6 (sgd),
# 1.1e-3 (phased).
TTT_RANK_TOLERANCE = 1e-9
# Bf16 NS would hide a 1e-5 check.
FP32_NS = functools.partial(tg.newton_schulz, dtype=torch.float32)


def muon_run(rank: int, world: int, steps: int = 3) -> dict:
    """Three Muon steps. world 2: each rank has its own gradients; world 1: their average."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in MUON_SHAPES]
    dist_env = tg.DistEnv(rank, world, rank, torch.device("cpu"))
    opt = tg.Muon(params, lr=0.05, momentum=0.9, wd=0.1, dist_env=dist_env, orthogonalize=FP32_NS)
    sq = []
    for step in range(steps):
        ranks = [rank] if world == 2 else [0, 1]
        gens = [torch.Generator().manual_seed(100 + 10 * step + r) for r in ranks]
        for p in params:
            p.grad = sum(torch.randn(p.shape, generator=gen) for gen in gens) / len(gens)
        sq.append(opt.reduce_grads().item())
        opt.step()
    return {"params": [p.detach() for p in params], "sq": sq}


def optimizer_step_run(rank: int, world: int) -> dict:
    """One optimizer_step (Muon + AdamW, clipping at 0.3) of a tiny GPT. world 2: each rank
    back-propagates its own row; world 1: both rows, each loss halved (= the rank average)."""
    torch.manual_seed(0)
    model = tg.GPT(TINY)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((0.05 * torch.randn(p.shape, generator=g)).to(p.dtype))
    dist_env = tg.DistEnv(rank, world, rank, torch.device("cpu"))
    opts = tg.build_optimizers(model, tg.TrainConfig(), dist_env, FP32_NS)
    for r in [rank] if world == 2 else [0, 1]:
        ids = torch.randint(4, 512, (1, 128), generator=torch.Generator().manual_seed(50 + r))
        ids[0, [0, 70]] = tg.BOS_ID
        loss = model(ids, ids.roll(-1, 1), tg.segment_starts(ids, 64), looping=True).mean()
        (loss if world == 2 else loss / 2).backward()
    seen, adam_step = {}, opts.adam.step

    def recording_adam_step():  # the averaged, clipped gradients AdamW receives
        seen["grads"] = [p.grad.clone() for p in opts.adam_params]
        return adam_step()

    opts.adam.step = recording_adam_step
    norm = tg.optimizer_step(opts, 0.3)
    matrices = {id(p) for p in model.param_groups()["matrices"]}
    return {
        "norm": norm.item(),
        "adam_grads": seen["grads"],
        "matrices": {
            k: p.detach().clone() for k, p in model.named_parameters() if id(p) in matrices
        },
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def eval_run(hp: tg.Hyperparameters, dist_env: tg.DistEnv) -> dict:
    """evaluate() of a fixed random model on the validation set, rows split over the ranks."""
    torch.manual_seed(3)
    model = tg.GPT(hp.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((0.05 * torch.randn(p.shape)).to(p.dtype))
    geo = tg.batch_geometry(hp, dist_env.world_size, "math", eval_row=256)
    val = tg.load_val(hp, dist_env, geo, tg.Logger(None, False))
    return tg.evaluate(model, val, looping=True, dist_env=dist_env)


def ttt_modes_run(dist_env: tg.DistEnv) -> dict[str, float]:
    """val_loss of every TTT_MODE on a fixed random model and a synthetic stream, rows split over
    the ranks."""
    import test_eval as E

    out = {}
    for mode in tg.TTT_MODES:
        # TTT rows of 128: 2 per chunk, one per rank
        env = dict(E.LORA_ENV, TTT_MODE=mode, TTT_CHUNK_TOKENS=256)
        hp = tg.Hyperparameters.from_env({k: str(v) for k, v in env.items()})
        geo = tg.batch_geometry(hp, dist_env.world_size, "math", eval_row=128)
        model, tokens = E.random_model(), E.stream(E.LORA_DOCS * 2, seed=7)
        val = tg.ValData(tg.pack_val_rows(tokens, 32, 128), E.fake_luts())
        log = tg.Logger(None, False)
        lora = tg.warmup_graphs(
            model, model, hp.eval, geo, dist_env, looping=True, compiled=False, log=log
        )
        work = tg.Work(dist_env.world_size)
        p = tg.ScoringPass(model, model, val, hp.eval, geo, dist_env, True, work, log)
        out[mode] = tg.eval_ttt(tg.ttt_mode(p, lora))["val_loss"]
    return out


WORKER = r"""
import json, os, sys
from pathlib import Path
sys.path[:0] = [{root!r}, {tests!r}]
import torch
import train_gpt as tg

out, mode = Path(sys.argv[1]), sys.argv[2]
rank = int(os.environ["RANK"])
if mode == "mapping":  # rendezvous data only in the mapping handed to setup_distributed
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    mapping = {{k: os.environ.pop(k) for k in names}}
    env = tg.setup_distributed(mapping)
    (out / f"mapping_rank{{rank}}.json").write_text(json.dumps({{"world": env.world_size}}))
    torch.distributed.destroy_process_group()
    sys.exit(0)

import test_dist as T
dist_env = tg.setup_distributed(os.environ)
assert dist_env.world_size == 2 and torch.distributed.get_backend() == "gloo"
if mode == "ttt":
    (out / f"ttt_rank{{rank}}.json").write_text(json.dumps(T.ttt_modes_run(dist_env)))
    torch.distributed.barrier()  # neither rank tears gloo down while the other still talks to it
    torch.distributed.destroy_process_group()
    sys.exit(0)

# Diagnose (instead of crashing gloo) when the ranks call all_reduce_mean_ with different tensors.
real_all_reduce_mean = tg.all_reduce_mean_
def checked_all_reduce_mean(tensors, dist_env):
    if dist_env.world_size > 1 and tensors:
        sigs = [None, None]
        torch.distributed.all_gather_object(sigs, [(str(t.dtype), t.numel()) for t in tensors])
        if sigs[0] != sigs[1]:
            (out / f"mismatch_rank{{rank}}.json").write_text(json.dumps(sigs))
            os._exit(3)
    return real_all_reduce_mean(tensors, dist_env)
tg.all_reduce_mean_ = checked_all_reduce_mean
torch.save(T.muon_run(rank, 2), out / f"muon_rank{{rank}}.pt")
torch.save(T.optimizer_step_run(rank, 2), out / f"optstep_rank{{rank}}.pt")
evaluation = T.eval_run(tg.Hyperparameters.from_env(os.environ), dist_env)
(out / f"eval_rank{{rank}}.json").write_text(json.dumps(evaluation))

# The whole run, configured from the environment like a torchrun launch.
final = tg.main(env=os.environ)
(out / f"final_rank{{rank}}.json").write_text(json.dumps(final))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    tmp_path: Path, mode: str, config: dict[str, object], timeout: float
) -> list[int | None]:
    """Run the worker as ranks 0 and 1 of a gloo group; returns their exit codes (None: killed)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), tests=str(Path(__file__).resolve().parent)))
    base = {k: v for k, v in os.environ.items() if k not in CONFIG_NAMES}
    base.update(
        {k: str(v) for k, v in config.items()},
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE="2",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
    )
    with contextlib.ExitStack() as stack:
        procs = []
        for rank in range(2):
            log = stack.enter_context(open(tmp_path / f"{mode}_rank{rank}.out", "w"))
            env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(script), str(tmp_path), mode],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=timeout))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                codes.append(None)
    return codes


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, tiny_run):
    """The tiny_run configuration (same data, same seed) run on 2 gloo ranks."""
    hp, final, _ = tiny_run
    tmp = tmp_path_factory.mktemp("dist")
    config = dict(hp.overrides(), OUT_DIR=tmp / "out")
    codes = launch(tmp, "run", config, timeout=300)
    if (tmp / "mismatch_rank0.json").exists():  # see test_collectives_not_issued_in_set_order
        first = [sig[0][0] for sig in json.loads((tmp / "mismatch_rank0.json").read_text())]
        pytest.fail(
            f"ranks issued collectives in different orders: rank 0 reduced {first[0]} first, "
            f"rank 1 {first[1]} (test_collectives_not_issued_in_set_order)"
        )
    outputs = "\n".join((tmp / f"run_rank{r}.out").read_text()[-3000:] for r in range(2))
    assert codes == [0, 0], outputs
    return tmp, final


def test_two_ranks_equal_one_rank(two_rank_run):
    """Same data per step, same steps, same validation targets. The scores agree to float noise: the
    tied embedding's bf16 gradients and the bf16 Newton-Schulz see sums in another order, and 40
    steps amplify that. Measured 2 vs 1 ranks (stdlib-docstring data): val_loss 1.6e-5,
    live_val_bpb 1.4e-4 relative (~2e-4 on the corpus data before); TTT itself adds nothing (see
    test_ttt_scores_do_not_depend_on_the_number_of_ranks). Tolerance 1e-3, about 5x the largest; the
    exact equalities are checked per optimizer step below."""
    tmp, single = two_rank_run
    finals = [json.loads((tmp / f"final_rank{r}.json").read_text()) for r in range(2)]
    for final in finals:
        final.pop("peak_mem_mib")  # each rank's own (ru_maxrss on the CPU: 855 vs 869 MiB seen)
    assert finals[0] == finals[1]  # every rank reports the all-reduced result
    double = finals[0]
    assert double["world_size"] == 2 and single["world_size"] == 1
    assert double["steps"] == single["steps"]
    assert (double["val_tokens"], double["val_bytes"]) == (
        single["val_tokens"],
        single["val_bytes"],
    )
    assert double["val_loss"] == pytest.approx(single["val_loss"], rel=1e-3)
    assert double["live_val_bpb"] == pytest.approx(single["live_val_bpb"], rel=1e-3)
    log = (tmp / "out" / "train.log").read_text()
    assert "dist world_size:2" in log and "grad_accum_steps:4" in log  # 8 // world


def test_logged_losses_are_the_global_batch_loss(tiny_run, two_rank_run):
    """Step lines log the loss over all ranks, so a 2-rank log reads like the 1-rank log of the same
    global batch (rank 0's own half would differ by sampling noise, ~0.1 on the H200 smoke run)."""
    (_, _, single_dir), (tmp, _) = tiny_run, two_rank_run

    def losses(
        log: Path,
    ) -> dict[int, float]:  # step lines come by wallclock, so compare the steps both logged
        return {
            int(s): float(v)
            for s, v in re.findall(r"^train step:(\d+)/\d+ loss:(\S+)", log.read_text(), re.M)
        }

    single, double = losses(single_dir / "train.log"), losses(tmp / "out" / "train.log")
    common = sorted(single.keys() & double.keys())
    assert len(common) >= 5 and [single[s] for s in common] == pytest.approx(
        [double[s] for s in common], rel=2e-3
    )


def test_evaluation_split_over_ranks_equals_one_rank(two_rank_run, tiny_run):
    """The score does not depend on how validation rows are split among ranks."""
    tmp, _ = two_rank_run
    ranks = [json.loads((tmp / f"eval_rank{r}.json").read_text()) for r in range(2)]
    threads = torch.get_num_threads()
    # As the workers (OMP_NUM_THREADS=1): the thread count changes bf16 sums.
    torch.set_num_threads(1)
    try:
        single = eval_run(tiny_run[0], tg.DistEnv(0, 1, 0, torch.device("cpu")))
    finally:
        torch.set_num_threads(threads)
    assert ranks[0] == ranks[1]
    assert (ranks[0]["val_tokens"], ranks[0]["val_bytes"]) == (
        single["val_tokens"],
        single["val_bytes"],
    )
    assert ranks[0]["val_loss"] == pytest.approx(single["val_loss"], rel=1e-12)


def test_sharded_muon_equals_single_process(two_rank_run):
    tmp, _ = two_rank_run
    ranks = [torch.load(tmp / f"muon_rank{r}.pt") for r in range(2)]
    for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        assert torch.equal(a, b)  # bit-identical on every rank
    reference = muon_run(0, world=1)
    for got, expected in zip(ranks[0]["params"], reference["params"], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # The averaged gradients' squared norm.
    assert ranks[0]["sq"] == pytest.approx(reference["sq"], rel=1e-5)


def test_optimizer_step_two_ranks_equals_averaged_gradients(two_rank_run):
    """AdamW gradients are averaged (not summed) over ranks, the clip sees the averaged gradients'
    norm, and the Muon matrices match. (AdamW's first step is g / (|g| + 1e-8) * lr, so a gradient
    element near 1e-8 turns float noise into an lr-sized difference: parameters after AdamW are
    compared at 1e-3, the gradients it received tightly.)"""
    tmp, _ = two_rank_run
    ranks = [torch.load(tmp / f"optstep_rank{r}.pt") for r in range(2)]
    assert ranks[0]["norm"] == ranks[1]["norm"]
    for k in ranks[0]["state"]:
        assert torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]), k  # bit-identical ranks
    reference = optimizer_step_run(0, world=1)
    assert ranks[0]["norm"] == pytest.approx(reference["norm"], rel=1e-5)
    assert reference["norm"] > 0.3  # clipping was active
    for got, expected in zip(ranks[0]["adam_grads"], reference["adam_grads"], strict=True):
        # Per-rank bf16 rounding: one bf16 ulp of the largest element.
        if got.dtype == torch.bfloat16:
            atol = 2**-7 * expected.abs().max().item()
            torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=atol)
        else:
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-9)
    for k, expected in reference["matrices"].items():
        torch.testing.assert_close(ranks[0]["matrices"][k], expected, atol=1e-5, rtol=1e-5, msg=k)
    for k, expected in reference["state"].items():
        torch.testing.assert_close(
            ranks[0]["state"][k].float(), expected.float(), atol=1e-3, rtol=0, msg=k
        )


def collectives_in_set_loops(source: str) -> list[int]:
    """Lines of `for ... in <set>` loops (set display, set comprehension or set(...)) whose body
    calls a collective helper: a set of torch.dtype iterates in an order that depends on object
    addresses, which differ between processes, so ranks would issue mismatched collectives."""
    collectives = {
        "all_reduce_",
        "all_reduce_mean_",
        "reduce_scatter_mean",
        "all_gather_cat",
        "all_reduce",
        "all_gather",
        "reduce_scatter_tensor",
        "all_gather_into_tensor",
        "broadcast",
    }
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.For, ast.comprehension)):
            continue
        it = node.iter
        set_call = isinstance(it, ast.Call) and getattr(it.func, "id", "") == "set"
        if isinstance(it, (ast.Set, ast.SetComp)) or set_call:
            body = node.body if isinstance(node, ast.For) else []
            calls = {
                getattr(c.func, "id", getattr(c.func, "attr", ""))
                for b in body
                for c in ast.walk(b)
                if isinstance(c, ast.Call)
            }
            if calls & collectives:
                lines.append(node.lineno)
    return lines


def test_collectives_not_issued_in_set_order():
    assert collectives_in_set_loops(Path(tg.__file__).read_text(encoding="utf-8")) == []


def test_set_order_detector_finds_the_pattern():
    bad = (
        "def f(gs, w):\n"
        "    for d in {g.dtype for g in gs}:\n"
        "        all_reduce_mean_([g for g in gs if g.dtype == d], w)\n"
    )
    good = bad.replace("in {g.dtype for g in gs}", "in sorted({g.dtype for g in gs}, key=str)")
    assert collectives_in_set_loops(bad) == [2] and collectives_in_set_loops(good) == []


def test_setup_distributed_uses_only_its_mapping(tmp_path):
    codes = launch(tmp_path, "mapping", {}, timeout=60)
    assert codes == [0, 0], (tmp_path / "mapping_rank0.out").read_text()[-2000:]


def test_ttt_scores_do_not_depend_on_the_number_of_ranks(tmp_path):
    """TTT rows have ttt_row_size tokens at any world size, so 1 and 2 ranks train on the
    same rows and agree in every mode to float summation order (the old rank-sliced rows: sgd 6e-6,
    phased 1.1e-3 apart)."""
    codes = launch(tmp_path, "ttt", {}, timeout=300)
    assert codes == [0, 0], (tmp_path / "ttt_rank0.out").read_text()[-3000:]
    ranks = [json.loads((tmp_path / f"ttt_rank{r}.json").read_text()) for r in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the thread count changes bf16 sums
    try:
        single = ttt_modes_run(tg.DistEnv(0, 1, 0, torch.device("cpu")))
    finally:
        torch.set_num_threads(threads)
    assert ranks[0] == ranks[1]
    for mode in tg.TTT_MODES:
        assert ranks[0][mode] == pytest.approx(single[mode], rel=TTT_RANK_TOLERANCE), mode

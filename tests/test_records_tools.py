"""Tests of scripts/make_record.py (submission.json, statistics) and scripts/plot_runs.py."""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import make_record  # noqa: E402
import plot_runs  # noqa: E402

NATS_PER_BIT = 2.5  # val_loss / val_bpb of the fake runs (ln 2 * bytes per token)


def write_log(path: Path, seed: int, loss: float, **final_overrides: object) -> Path:
    """A log shaped like train_gpt.py's: source block, config, versions, steps, val, final."""
    final = {
        "val_loss": loss,
        "val_bpb": loss / NATS_PER_BIT,
        "val_tokens": 1000,
        "val_bytes": 2500,
        "steps": 4000 + seed,
        "train_time_ms": 598_000.0,
        "peak_mem_mib": 40000,
        "attn_backend": "fa3",
        "world_size": 8,
        "seed": seed,
        "run_id": f"run_seed{seed}",
        "bytes_model": 15_900_000,
        "bytes_code": 30_000,
        "bytes_total": 15_930_000 + seed,
        "eval_time_ms": 400_000.0,
        "prequant_val_bpb": 1.07,
        "quant_val_bpb": 1.08,
    }
    final.update(final_overrides)
    final = {k: v for k, v in final.items() if v is not None}
    lines = [
        "source /x/train_gpt.py",
        '"""Docstring of the source:',
        "train step:999/1 loss:0.0 time_ms:1",
        'final {"val_bpb": 0.0}',
        '"""',
        "config " + json.dumps({"seed": seed, "run_id": f"run_seed{seed}", "num_layers": 11}),
        f"overrides SEED={seed}",
        "versions python:3.11.7 torch:2.9.1 cuda:12.8 numpy:2.1.0",
        "dist world_size:8 device:cuda:0",
        "gpu name:NVIDIAH100SXM",
        "git commit:abc123",
        "train start time_to_first_step_ms:5000 tokens_per_step:786432 budget_ms:599500",
    ]
    for step in (1, 2, 500, 1000):
        lines.append(
            f"train step:{step}/20000 loss:{9.0 / step**0.3:.4f} time_ms:{step * 120} "
            f"step_ms:120.0 tok_s:6500000 lr_mult:1.0 frac:{step / 5000:.4f} eta_s:500"
        )
    lines += [
        "val step:500 loss:3.1 bpb:1.2 train_time_ms:60000",
        "val step:1000 loss:3.0 bpb:1.15",
        "train stop steps:1000 train_time_ms:120000 looping:True",
        "val ema loss:2.9 bpb:1.1",
        "final " + json.dumps(final),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_parse_fields() -> None:
    assert make_record.parse_fields("train step:12/100 loss:3.1") == (
        "train",
        {"step": "12/100", "loss": "3.1"},
    )
    assert make_record.parse_fields("dist world_size:8 device:cuda:0") == (
        "dist",
        {"world_size": "8", "device": "cuda:0"},
    )
    assert make_record.parse_fields("val ema loss:2.9 bpb:1.1")[0] == "val ema"


def test_submission_from_three_seeds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    losses = {42: 2.70, 0: 2.71, 1234: 2.72}
    logs = [str(write_log(tmp_path / f"train_seed{s}.log", s, loss)) for s, loss in losses.items()]
    sub = make_record.main(
        logs
        + [
            "--name",
            "Test",
            "--author",
            "Me",
            "--github-id",
            "me",
            "--blurb",
            "b",
            "--baseline-loss",
            "2.75",
            "--baseline-bpb",
            "1.1",
        ]
    )
    assert json.loads((tmp_path / "submission.json").read_text()) == sub
    assert sub["seeds"] == [42, 0, 1234]
    assert sub["val_loss"] == pytest.approx(2.71)
    assert sub["val_loss_std"] == pytest.approx(statistics.stdev(losses.values()))
    assert sub["val_bpb"] == pytest.approx(2.71 / NATS_PER_BIT)
    assert sub["bytes_total"] == 15_930_000 + 1234
    assert sub["artifact_bytes_mean"] == pytest.approx(15_930_000 + 1276 / 3)
    assert sub["seed_results"]["42"]["step_avg_ms"] == pytest.approx(598_000 / 4042, abs=0.01)
    assert sub["seed_results"]["0"]["log"] == "train_seed0.log"
    assert sub["hardware"] == "8xNVIDIAH100SXM" and sub["pytorch_version"] == "2.9.1"
    assert sub["cuda_version"] == "12.8" and sub["git_commit"] == "abc123"
    assert sub["compliance"] == {
        "train_under_600s": True,
        "artifact_under_16mb": True,
        "eval_under_600s": True,
        "three_seeds": True,
    }
    # By hand: improvements 0.05, 0.04, 0.03 nats -> mean 0.04, std 0.01, t = 0.035 / (0.01 / sqrt
    # 3), df = 2, whose upper tail is 1/2 - t / (2 sqrt(2 + t^2)).
    sig = sub["significance"]
    t = 0.035 / (0.01 / math.sqrt(3))
    assert sig["t"] == pytest.approx(t) and sig["df"] == 2
    assert sig["p_value"] == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), rel=1e-9)
    assert sig["p_value"] == pytest.approx(0.01307, abs=1e-5)
    assert sig["clears_record_bar"] is False  # 0.013 > 0.01
    assert sig["delta_nats"] == pytest.approx(0.04)
    assert sig["delta_bpb"] == pytest.approx(1.1 - 2.71 / NATS_PER_BIT)
    out = capsys.readouterr().out
    assert "not cleared" in out and "p=0.0131" in out


def test_baseline_loss_from_bpb_and_record_bar(tmp_path: Path) -> None:
    logs = [
        str(write_log(tmp_path / f"s{s}.log", s, 2.700 + 0.001 * i))
        for i, s in enumerate((1, 2, 3))
    ]
    sub = make_record.main(logs + ["--baseline-bpb", "1.2", "--out", str(tmp_path / "sub.json")])
    sig = sub["significance"]
    assert sig["baseline_loss"] == pytest.approx(1.2 * NATS_PER_BIT)
    assert sig["baseline_loss_source"] == "from_bpb"
    assert sig["delta_nats"] == pytest.approx(3.0 - 2.701)
    assert sig["p_value"] < 1e-4 and sig["clears_record_bar"] is True


def test_missing_fields_are_null_with_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    logs = [
        str(write_log(tmp_path / "a.log", 1, 2.7, bytes_total=None, eval_time_ms=None)),
        str(write_log(tmp_path / "b.log", 2, 2.7, train_time_ms=601_000.0)),
    ]
    sub = make_record.main(logs)
    err = capsys.readouterr().err
    assert "a.log: final line has no bytes_total" in err and "eval_time_ms" in err
    assert sub["bytes_total"] is None and sub["seed_results"]["1"]["bytes_total"] is None
    assert sub["compliance"] == {
        "train_under_600s": False,
        "artifact_under_16mb": None,
        "eval_under_600s": None,
        "three_seeds": False,
    }
    assert sub["significance"] is None


def test_log_without_final_line(tmp_path: Path) -> None:
    (tmp_path / "x.log").write_text("train step:1/10 loss:5.0 time_ms:100\n")
    with pytest.raises(SystemExit, match="no `final"):
        make_record.main([str(tmp_path / "x.log")])


@pytest.mark.parametrize("t", [-7.5, -1.0, -0.2, 0.0, 0.3, 1.0, 2.5, 6.9646, 40.0])
def test_student_t_sf_exact_forms(t: float) -> None:
    # df = 1 is the Cauchy distribution; df = 2 has a closed form too.
    assert make_record.student_t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-12)
    assert make_record.student_t_sf(t, 2) == pytest.approx(
        0.5 - t / (2 * math.sqrt(2 + t * t)), abs=1e-12
    )


def test_student_t_sf_known_quantiles() -> None:
    # Table values: one-sided 1% critical points of t for df = 2, 4, 9, 30.
    for df, t99 in ((2, 6.964557), (4, 3.746947), (9, 2.821438), (30, 2.457262)):
        assert make_record.student_t_sf(t99, df) == pytest.approx(0.01, rel=1e-5)


def test_student_t_sf_against_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 17, 120):
        for t in (-4.0, -0.5, 0.1, 1.7, 3.3, 12.0):
            assert make_record.student_t_sf(t, df) == pytest.approx(
                stats.t.sf(t, df), rel=1e-9, abs=1e-15
            )


def test_plot_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    logs = [str(write_log(tmp_path / f"train_seed{s}.log", s, 2.7)) for s in (1, 2)]
    curves = plot_runs.read_curves(Path(logs[0]))
    # Source block skipped.
    assert curves.label == "run_seed1" and curves.train_step == [
        1,
        2,
        500,
        1000,
    ]
    assert curves.val_time_s == [60.0, 120.0]  # the second one interpolated from the train lines
    out = plot_runs.main(logs + ["--out", str(tmp_path / "runs.png")])
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_plot_shows_the_final_scores_of_a_run_without_val_lines(tmp_path: Path) -> None:
    """The quickstart logs no `val step:` line: its bpb panel shows the final flat / sliding / TTT
    scores."""
    pytest.importorskip("matplotlib")
    log = write_log(tmp_path / "train.log", 1, 2.7, sliding_val_bpb=1.07, ttt_val_bpb=1.05)
    log.write_text(
        "\n".join(line for line in log.read_text().splitlines() if not line.startswith("val "))
    )
    curves = plot_runs.read_curves(log)
    assert curves.val_step == [] and curves.final_bpb == {
        "flat": 1.08,
        "sliding": 1.07,
        "TTT": 1.05,
    }
    out = plot_runs.main([str(log), "--out", str(tmp_path / "runs.png")])
    assert out.read_bytes().startswith(b"\x89PNG")


def test_records_readme_lists_every_testbed_folder() -> None:
    listed = set(
        re.findall(
            r"^\| `testbed/([^/`]+)/` \|", (ROOT / "records" / "README.md").read_text(), re.M
        )
    )
    assert listed == {p.name for p in (ROOT / "records" / "testbed").iterdir() if p.is_dir()}

"""PRESET=<name> (README "Presets"): one table of field overrides per seed record; explicit
variables win; the log header names the preset and its fields; the full-size model of each preset
has the record's logged parameter count; --dry-run shows it all without data; every preset trains a
tiny CPU model end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt as tg
from train_gpt import ConfigError, Hyperparameters

ROOT = Path(tg.__file__).resolve().parent
# model_params as each record's training log prints it.
RECORD_PARAMS = {
    "pr1855": 35_945_671,
    "pr2005": 35_989_592,
    "pr1492": 35_944_536,
    "pr1536": 35_944_537,
    "pr1435": 32_665_181,
    "pr1232": 27_137_223,
}


def approx(value: object) -> object:
    return pytest.approx(value) if isinstance(value, (float, list)) else value


def full_size_params(hp: Hyperparameters) -> int:
    with torch.device("meta"):  # shapes only: fast
        return sum(p.numel() for p in tg.GPT(hp.model).parameters())


# ---------------------------------------------------------------- the table -----------------------
def test_the_presets_are_the_seed_records():
    assert list(tg.PRESETS) == list(RECORD_PARAMS)


@pytest.mark.parametrize("name", RECORD_PARAMS)
def test_full_size_parameter_count_equals_the_records_log(name):
    assert full_size_params(Hyperparameters.from_env({"PRESET": name})) == RECORD_PARAMS[name]


def test_every_preset_entry_is_a_field_and_resolves_to_its_value():
    default = Hyperparameters().flat()
    for name, table in tg.PRESETS.items():
        hp = Hyperparameters.from_env({"PRESET": name})
        assert hp.preset == name and set(table) <= set(default), name
        for key, value in table.items():
            assert hp.flat()[key] == approx(value), (name, key)
        assert set(hp.overrides()) - {"PRESET"} <= set(table)  # nothing else moves


def test_the_defaults_are_pr1855_less_its_unused_lane_scalars():
    hp = Hyperparameters.from_env({"PRESET": "pr1855"})
    assert hp.overrides() == {"PRESET": "pr1855", "LANE_SCALARS_ALL_LAYERS": True}
    assert full_size_params(Hyperparameters()) == RECORD_PARAMS["pr1855"] - 8 * (2 + 4)


def test_preset_values_as_the_records_ran_them():
    """Spot checks of as-run values that the counts do not pin."""
    p1232 = Hyperparameters.from_env({"PRESET": "pr1232"})
    assert (
        p1232.model.rope_base == pytest.approx(22081.79, abs=0.01) and p1232.model.mlp_mult == 3.0
    )
    assert p1232.train.max_wallclock_seconds == 0 and p1232.train.iterations == 20_000
    warmdown = (
        p1232.train.warmdown_frac,
        p1232.train.min_lr,
    )  # from step 8,000: (20,000 - step) / 12,000
    assert [tg.lr_multiplier(s / 20000, *warmdown) for s in (7999, 8000, 14000)] == approx(
        [1.0, 1.0, 0.5]
    )
    p1536 = Hyperparameters.from_env({"PRESET": "pr1536"}).eval
    assert p1536.ttt_lora_alpha / p1536.ttt_lora_rank == 1.0 and p1536.ttt_mode == "lora"
    assert not Hyperparameters.from_env({"PRESET": "pr1435"}).eval.ttt_enabled
    # #1536 ("VarLenDocTTT") and #1855 attend within documents; the older records across them.
    doc_masked = {
        n for n in tg.PRESETS if Hyperparameters.from_env({"PRESET": n}).train.train_doc_mask
    }
    assert doc_masked == {"pr1536", "pr1855"}


def test_explicit_variables_win_over_the_preset():
    env = {"PRESET": "pr1435", "MATRIX_LR": "0.05", "VOCAB_SIZE": "2048", "SMEAR": "off"}
    hp = Hyperparameters.from_env(env)
    assert (hp.train.matrix_lr, hp.model.vocab_size, hp.model.smear) == (0.05, 2048, "off")
    assert (
        hp.model.bigram_buckets == 1536 and hp.train.loop_at_step == 3000
    )  # the rest of the preset holds


def test_unknown_preset_is_refused_listing_the_valid_names():
    with pytest.raises(
        ConfigError,
        match=r"PRESET='pr9999' is not one of pr1855, pr2005, pr1492, pr1536, "
        r"pr1435, pr1232",
    ):
        Hyperparameters.from_env({"PRESET": "pr9999"})
    with pytest.raises(ConfigError, match="PRESET"):
        Hyperparameters(preset="sota")


def test_preset_line_names_every_field_and_marks_what_the_environment_overrode():
    env = {"PRESET": "pr2005", "MATRIX_LR": "0.03"}
    line = tg.preset_line(Hyperparameters.from_env(env), env)
    assert line.startswith("preset pr2005 ") and "ATTN_GATE=headwise" in line
    assert "MATRIX_LR=0.022(env:0.03)" in line
    assert len(line.split()) == 2 + len(tg.PRESETS["pr2005"])
    assert tg.preset_line(Hyperparameters(), {}) == "preset none"


# ---------------------------------------------------------------- --dry-run -----------------------
def test_dry_run_prints_the_preset_config_count_and_backend_without_data(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in Hyperparameters().flat()}
    env.update(PRESET="pr1435", MAX_WALLCLOCK_SECONDS="300", DATA_PATH=str(tmp_path / "none"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_gpt.py"), "--dry-run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    config = json.loads(next(line for line in lines if line.startswith("config "))[7:])
    assert config["PRESET"] == "pr1435" and config["BIGRAM_BUCKETS"] == 1536
    assert config["MAX_WALLCLOCK_SECONDS"] == 300  # the environment over the preset
    assert any(line.startswith("preset pr1435 VOCAB_SIZE=1024 ") for line in lines)
    assert "model params:32665181 attn_backend:math attn_backend_dense:math" in lines
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- a tiny run per preset -----------
# The preset's switches stay on; only sizes shrink: 4 layers x 64 (the preset's layer indices
# mapped onto
# them), 6 steps of 2,048 tokens, small tables, TTT batches and calibration, a quarter of the
# validation set.
TINY_SIZES = dict(
    NUM_LAYERS=4,
    MODEL_DIM=64,
    NUM_HEADS=4,
    NUM_KV_HEADS=2,
    ROPE_DIMS=8,
    LOOP_START=1,
    LOOP_END=1,
    PARALLEL_START_LAYER=3,
    ITERATIONS=6,
    MAX_WALLCLOCK_SECONDS=0,
    WARMUP_STEPS=1,
    TRAIN_SEQ_LEN=128,
    EVAL_SEQ_LEN=128,
    EVAL_STRIDE=96,
    TRAIN_BATCH_TOKENS=2048,
    COMPILE=0,
    GPTQ_CALIBRATION_BATCHES=2,
    TTT_CHUNK_TOKENS=2048,
    TTT_EPOCHS=1,
    TTT_BATCH_DOCS=4,
    TTT_LORA_RANK=4,
)
TINY_LAYERS = {
    "pr1435": dict(LOOP_AT_STEP=3, SKIP_COUNT=2, VE_LAYERS="2,3", BIGRAM_BUCKETS=64, BIGRAM_DIM=16),
    "pr1232": dict(PARALLEL_START_LAYER=4, BIGRAM_BUCKETS=64, BIGRAM_DIM=16),
    "pr1536": dict(TTT_LORA_ALPHA=4.0),
}


@pytest.fixture(scope="module")
def small_data(tiny_data, tmp_path_factory) -> Path:
    """tiny_data's training shards; its validation stream cut to the first ~5,000 tokens (whole
    documents)."""
    folder = tmp_path_factory.mktemp("small_data")
    for shard in tg.shard_paths(tiny_data.path, "train"):
        (folder / shard.name).symlink_to(shard)
    bos = [i for i, t in enumerate(tiny_data.val_tokens.tolist()) if t == tg.BOS_ID]
    tg.write_shard(
        folder / "fineweb_val_000000.bin", tiny_data.val_tokens[: min(b for b in bos if b >= 5000)]
    )
    return folder


@pytest.mark.parametrize("name", RECORD_PARAMS)
def test_every_preset_trains_a_tiny_model_end_to_end(
    name, tiny_data, small_data, tmp_path, monkeypatch
):
    betas, adamw = [], torch.optim.AdamW
    monkeypatch.setattr(
        torch.optim, "AdamW", lambda *a, **kw: betas.append(kw["betas"]) or adamw(*a, **kw)
    )
    env = dict(
        TINY_SIZES,
        **TINY_LAYERS.get(name, {}),
        PRESET=name,
        DATA_PATH=small_data,
        TOKENIZER_PATH=tiny_data.tokenizer_path,
        VOCAB_SIZE=tiny_data.vocab_size,
        OUT_DIR=tmp_path,
    )
    env = {k: str(v) for k, v in env.items()}
    hp = Hyperparameters.from_env(env)
    final = tg.main(hp, env=env)
    assert math.isfinite(final["val_bpb"]) and final["steps"] == 6 and final["bytes_total"] > 0
    log = (tmp_path / "train.log").read_text(encoding="utf-8").splitlines()
    assert any(line.startswith(f"preset {name} ") for line in log)
    expected_last = {"pr1435": "sliding_val_bpb", "pr1536": "ttt_val_bpb"}.get(name, "ttt_val_bpb")
    assert final["val_bpb"] == final[expected_last]
    model, _ = tg.load_artifact(
        tmp_path / "final_model.pgz", hp.model, ("math", "math"), torch.device("cpu")
    )
    model_fields = {k.upper() for k in dataclasses.asdict(hp.model)}
    for key, value in tg.PRESETS[
        name
    ].items():  # the preset's modules, unshrunk, are in the artifact's model
        if key in model_fields and key not in env:
            assert getattr(model.cfg, key.lower()) == approx(value), key
    if name == "pr1435":  # recurrence from step 3; sliding windows are the last pass (no TTT)
        assert (
            any(line.startswith("loop enabled step:3 ") for line in log)
            and "ttt_val_bpb" not in final
        )
    if name == "pr1536":  # LoRA TTT's AdamW with beta2 0.999, no sliding pass
        assert (0.0, 0.999) in betas and "sliding_val_bpb" not in final

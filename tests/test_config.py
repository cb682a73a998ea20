"""Section 2 (Config): env parsing, validation, defaults = the record (PR #1855), no dead knobs."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

import train_gpt as tg
from train_gpt import ConfigError, Hyperparameters

SOURCE = Path(tg.__file__).read_text(encoding="utf-8")


def leaf_fields(cls: type = Hyperparameters) -> list[str]:
    """Every configurable field name (nested groups flattened), in declaration order."""
    hints = typing.get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        names += leaf_fields(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else [f.name]
    return names


# ---------------- parsing -------------------------------------------------------------------------
def test_from_env_parses_each_type():
    hp = Hyperparameters.from_env(
        {
            "NUM_LAYERS": " 9 ",
            "MATRIX_LR": "0.03",
            "RUN_ID": "abc",
            "XSA_LAYERS": "0-3,7",
            "MLP_MULT": "3",
            "EVAL_SEQ_LEN": "1024",
            "MAX_WALLCLOCK_SECONDS": "0",
        }
    )
    assert hp.model.num_layers == 9 and type(hp.model.num_layers) is int
    assert hp.train.matrix_lr == 0.03 and type(hp.train.matrix_lr) is float
    assert hp.model.mlp_mult == 3.0 and type(hp.model.mlp_mult) is float
    assert hp.run_id == "abc" and hp.model.xsa_layers == "0-3,7"
    assert hp.eval.eval_seq_len == 1024
    assert hp.train.max_wallclock_seconds == 0.0
    assert hp.seed == 1337  # untouched fields keep their defaults


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0", False),
        ("1", True),
        ("true", True),
        ("False", False),
        ("on", True),
        ("off", False),
        ("auto", None),
        ("", None),
    ],
)
def test_compile_is_an_optional_bool(text, expected):
    assert Hyperparameters.from_env({"COMPILE": text}).train.compile is expected


def test_compile_unset_is_none():
    assert Hyperparameters.from_env({}).train.compile is None


@pytest.mark.parametrize(
    "name, text",
    [
        ("NUM_LAYERS", "abc"),
        ("NUM_LAYERS", "1.5"),
        ("MATRIX_LR", "fast"),
        ("SEED", ""),
        ("COMPILE", "maybe"),
        ("EVAL_SEQ_LEN", "2k"),
    ],
)
def test_bad_value_raises_naming_the_variable(name, text):
    with pytest.raises(ConfigError, match=name):
        Hyperparameters.from_env({name: text})


@pytest.mark.parametrize(
    "env, name",
    [
        ({"NUM_HEADS": "7"}, "NUM_HEADS"),  # 512 % 7 != 0
        ({"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS"),
        ({"ROPE_DIMS": "15"}, "ROPE_DIMS"),
        ({"LOOP_END": "11"}, "LOOP_END"),  # LOOP_END >= NUM_LAYERS
        ({"NUM_LAYERS": "5", "LOOP_END": "5"}, "LOOP_END"),
        ({"LOOP_START": "6"}, "LOOP_START"),
        ({"PARALLEL_START_LAYER": "4"}, "PARALLEL_START_LAYER"),  # inside the loop / encoder
        ({"ATTN_BACKEND": "flash"}, "ATTN_BACKEND"),
        ({"XSA_LAYERS": "0,x"}, "XSA_LAYERS"),
        ({"XSA_LAYERS": "0-11"}, "XSA_LAYERS"),  # layer 11 does not exist
        ({"WARMDOWN_FRAC": "1.5"}, "WARMDOWN_FRAC"),
        ({"TRAIN_SEQ_LEN": "0"}, "TRAIN_SEQ_LEN"),
        ({"EVAL_SEQ_LEN": "0"}, "EVAL_SEQ_LEN"),
        ({"VOCAB_SIZE": "70000"}, "VOCAB_SIZE"),
        ({"COMPRESSOR": "zip"}, "COMPRESSOR"),
        ({"MATRIX_BITS": "9"}, "MATRIX_BITS"),
        ({"TTT_MODE": "slot"}, "TTT_MODE"),
        ({"TTT_LORA_CHUNK": "0"}, "TTT_LORA_CHUNK"),
        ({"TTT_PREFIX_DOCS": "-1"}, "TTT_PREFIX_DOCS"),
    ],
)
def test_invalid_setting_raises_naming_the_variable(env, name):
    with pytest.raises(ConfigError, match=name):
        Hyperparameters.from_env(env)


def test_field_names_unique_across_groups():
    groups = [
        f.name
        for f in dataclasses.fields(Hyperparameters)
        if dataclasses.is_dataclass(f.default_factory)
    ]
    assert {"model", "train", "eval"} <= set(groups)
    names = leaf_fields()
    assert len(names) == len(set(names))
    assert set(Hyperparameters().flat()) == {n.upper() for n in names}


def test_overrides_lists_exactly_the_changed_fields():
    # SEED = default.
    hp = Hyperparameters.from_env(
        {"NUM_LAYERS": "9", "MATRIX_LR": "0.03", "SEED": "1337", "COMPILE": "0"}
    )
    assert hp.overrides() == {"NUM_LAYERS": 9, "MATRIX_LR": 0.03, "COMPILE": False}
    assert Hyperparameters().overrides() == {}


# ---------------- defaults = the record -----------------------------------------------------------
def test_defaults_equal_the_record():
    m, t, e = tg.ModelConfig(), tg.TrainConfig(), tg.EvalConfig()
    assert (m.vocab_size, m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads) == (
        8192,
        11,
        512,
        8,
        4,
    )
    assert (m.mlp_mult, m.rope_dims, m.rope_base, m.qk_gain_init, m.logit_softcap) == (
        4.0,
        16,
        1e4,
        5.0,
        30.0,
    )
    assert (m.xsa_layers, m.tied_embed_init_std) == ("all", 0.005)
    assert (m.loop_start, m.loop_end, m.num_loops, t.enable_looping_at) == (3, 5, 2, 0.35)
    assert m.parallel_start_layer == 8
    assert (t.train_batch_tokens, t.train_seq_len, e.eval_seq_len) == (786_432, 2048, 2048)
    assert (t.iterations, t.max_wallclock_seconds, t.warmup_steps, t.val_loss_every) == (
        20_000,
        600.0,
        3,
        0,
    )
    assert (t.matrix_lr, t.tied_embed_lr, t.scalar_lr) == (0.026, 0.03, 0.02)
    assert (t.muon_momentum, t.muon_wd, t.embed_wd, t.adam_wd, t.beta2) == (
        0.97,
        0.095,
        0.085,
        0.02,
        0.99,
    )
    assert (t.grad_clip_norm, t.ema_decay, t.warmdown_frac, t.min_lr) == (0.3, 0.9965, 0.85, 0.1)
    assert (t.grad_accum_steps, t.compile, t.attn_backend) == (0, None, "auto")
    assert tg.MOMENTUM_WARMUP == (0.92, 1500) and (tg.ADAM_BETA1, tg.ADAM_EPS) == (0.9, 1e-8)
    assert (tg.GATE_WINDOW, tg.ATTN_GATE_SCALE, tg.LANE_RESID_INIT) == (12, 0.5, 1.1)
    assert Hyperparameters().model == m and Hyperparameters().train == t


def test_quant_defaults_equal_the_record():
    """PR #1855's quantization, except GPTQ_RESERVE_SECONDS: the records reserve 0.5 s although
    calibration takes ~5 s; this trainer reserves more on purpose, so only its sign is
    checked."""
    q = Hyperparameters().quant
    assert (q.matrix_bits, q.embed_bits, q.gptq_calibration_batches) == (6, 7, 16)
    assert (q.attn_clip_sigmas, q.mlp_clip_sigmas, q.embed_clip_sigmas) == (13.0, 11.5, 14.0)
    assert q.gptq_reserve_seconds > 0


def test_ttt_defaults_equal_the_record_except_where_measured():
    """PR #1855's evaluation. Two deliberate differences: TTT_MODE is sgd, the only mode projected
    inside the 600 s eval limit on the H100 testbed (495 s; lora 837 s, phased 1,327 s, though
    phased scored 0.033 bpb better), and 32 documents per LoRA batch, not 64 (the 32-document batch
    peaked at 25.9 GiB compiled on the H100; 64 was not measured)."""
    e = Hyperparameters().eval
    assert (e.eval_stride, e.ttt_chunk_tokens, e.ttt_epochs, e.ttt_lr) == (64, 32768, 3, 0.005)
    assert (e.ttt_lora_rank, e.ttt_lora_lr, e.ttt_lora_chunk) == (80, 1e-4, 48)
    assert (e.ttt_prefix_docs, e.ttt_phases, e.ttt_global_lr) == (2500, 3, 0.001)
    assert (e.ttt_lora_alpha, tg.LORA_BETA1, e.ttt_lora_beta2, tg.LORA_WD) == (
        144.0,
        0.0,
        0.99,
        0.5,
    )
    assert (e.ttt_mode, e.ttt_batch_docs) == ("sgd", 32)


def test_every_field_is_read_outside_the_config_section():
    """No dead knobs: each field is read as `.name` somewhere after section 2 (validation alone
    does not count)."""
    start, end = SOURCE.index("# 2. Config"), SOURCE.index("# 3. Runtime")
    rest = SOURCE[:start] + SOURCE[end:]
    unused = [n for n in leaf_fields() if not re.search(rf"\.{n}\b", rest)]
    assert unused == []


# ---------------- main() stops on bad paths -------------------------------------------------------
def test_missing_data_path_stops_main(tiny_hp, tmp_path):
    hp = tiny_hp(tmp_path / "out", DATA_PATH=tmp_path / "no_such_folder")
    with pytest.raises(ConfigError, match="DATA_PATH"):
        tg.main(hp, env={})


def test_data_path_without_shards_stops_main(tiny_hp, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="DATA_PATH"):
        tg.main(tiny_hp(tmp_path / "out", DATA_PATH=tmp_path / "empty"), env={})


def test_vocab_mismatch_stops_main(tiny_hp, tiny_data, tmp_path):
    hp = tiny_hp(tmp_path / "out", VOCAB_SIZE=tiny_data.vocab_size + 64)
    with pytest.raises(ConfigError, match=r"TOKENIZER_PATH.*VOCAB_SIZE"):
        tg.main(hp, env={})


def test_missing_tokenizer_stops_main(tiny_hp, tmp_path):
    with pytest.raises(ConfigError, match="TOKENIZER_PATH"):
        tg.main(tiny_hp(tmp_path / "out", TOKENIZER_PATH=tmp_path / "none.model"), env={})

"""Model FLOPs utilisation (benchmarks/mfu.py): the FLOPs count against a hand computation, the
MFU arithmetic, a quick peak measurement, and side_by_side's bf16 selection by CPU."""

import json
import time

import pytest
import torch
import yaml

import benchmarks.side_by_side as side_by_side
from benchmarks.harness import _flops_figures
from benchmarks.mfu import (
    attended_span,
    data_lengths,
    lora_for_run,
    matmul_peak,
    mfu,
    model_flops_per_token,
    projection_shapes,
    run_dtype,
)

# hidden 8, 2 heads of 4 (one kv head), MLP 16, 2 layers, vocab 10
TINY = {
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 10,
    "tie_word_embeddings": True,
}

# the anchors' Llama (shared/bench/anchors/make_model.py): 27.8M matmul parameters
ANCHORS = {
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 8192,
}


def test_the_anchors_model_needs_about_180_mflop_a_token_at_512():
    matmul_parameters = 8 * (2 * 512 * 512 + 2 * 512 * 256 + 3 * 512 * 1408) + 512 * 8192
    assert matmul_parameters == 27_787_264
    flops = model_flops_per_token(ANCHORS, 512)
    assert flops == 6 * matmul_parameters + 6 * 8 * 8 * 64 * 512
    assert 179e6 < flops < 180e6


def test_full_fine_tuning_flops_per_token_match_a_hand_count():
    # a layer: q 8x8, k 8x4, v 8x4, o 8x8 (attention 192) + gate, up 8x16, down 16x8 (384)
    layer = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 16
    matmul_parameters = 2 * layer + 8 * 10  # the head counts though tied; embeddings do not
    attention = 6 * 2 * 2 * 4 * 32  # 6 x layers x heads x head_dim x seq (causal)
    assert model_flops_per_token(TINY, seq_len=32) == 6 * matmul_parameters + attention


def test_lora_counts_frozen_forward_and_input_gradients_plus_the_adapters():
    layer = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 16
    frozen = 4 * (2 * layer + 8 * 10)
    adapters = 6 * 2 * 2 * ((8 + 8) + (8 + 4))  # rank 2 on q and k, two layers
    attention = 6 * 2 * 2 * 4 * 32
    lora = model_flops_per_token(TINY, 32, lora_rank=2, lora_targets=["q_proj", "k_proj"])
    assert lora == frozen + adapters + attention
    assert model_flops_per_token(ANCHORS, 512, lora_rank=8) < model_flops_per_token(ANCHORS, 512)
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        model_flops_per_token(TINY, 32, lora_rank=2, lora_targets=["qkv"])


def test_mfu_is_achieved_flops_over_the_peak():
    assert mfu(tokens_per_second=500, flops_per_token=180e6, peak=150e9) == pytest.approx(0.6)


def test_a_run_config_gives_its_dtype_and_lora_targets():
    assert run_dtype({"dtype": "fp32", "autocast": "bf16"}) == "bf16"
    assert run_dtype({"dtype": "fp32"}) == "fp32"
    assert lora_for_run({"lora": {"rank": 8, "target_modules": "all-linear"}})[1] == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    ]  # fmt: skip
    assert lora_for_run({}) == (None, [])


def test_projection_shapes_repeat_each_layers_products():
    shapes = projection_shapes(TINY, tokens=16)
    assert len(shapes) == 7 * 2 + 1
    assert shapes.count((16, 8, 16)) == 4  # gate and up, two layers
    assert shapes[-1] == (16, 8, 10)  # the head, once


def test_matmul_peak_is_positive_and_quick_on_a_tiny_shape():
    started = time.perf_counter()
    peak = matmul_peak(torch.float32, [(64, 64, 64), (64, 64, 32)], seconds=0.2)
    assert peak > 0
    assert time.perf_counter() - started < 2


def test_side_by_side_leaves_bf16_settings_out_on_a_cpu_without_bf16(monkeypatch):
    attune = ["full_fp32", "full_bf16", "lora_packed_bf16_autocast", "lora_fp32"]
    anchors = ["tt_full_fp32", "tt_lora_bf16", "trl_full_bf16amp"]
    monkeypatch.setattr(side_by_side, "has_bf16_instructions", lambda *a: False)
    kept_attune, kept_anchors, left_out = side_by_side.select_settings(attune, anchors)
    assert kept_attune == ["full_fp32", "lora_fp32"]
    assert kept_anchors == ["tt_full_fp32"]
    assert left_out == [
        "attune_full_bf16", "attune_lora_packed_bf16_autocast", "tt_lora_bf16", "trl_full_bf16amp",
    ]  # fmt: skip
    # asked for, or on a CPU with bf16 instructions (or one that cannot tell), all of them run
    assert side_by_side.select_settings(attune, anchors, keep_bf16=True)[2] == []
    monkeypatch.setattr(side_by_side, "has_bf16_instructions", lambda *a: None)
    assert side_by_side.select_settings(attune, anchors) == (attune, anchors, [])


def test_side_by_side_reports_mfu_beside_tokens_per_second():
    table = {
        "attune_full_fp32": {
            "tokens_per_second": 500.0, "peak_rss_gb": 1.0, "loss": 2.0, "step_seconds": 4.0,
        },
        "tt_lora_bf16": {
            "tokens_per_second": 100.0, "peak_rss_gb": 1.0, "loss": 2.0, "step_seconds": 4.0,
        },
    }  # fmt: skip
    figures = {
        "cpu": "x86_64, flags: avx2 yes",
        "peaks": {"fp32": 150e9, "bf16": 50e9},
        "flops_per_token": {"full": 180e6, "lora": 100e6},
        "left_out": ["attune_full_bf16"],
    }
    text = side_by_side.report(table, 1, figures)
    assert "| attune_full_fp32 | 500 | 60% |" in text
    assert "| tt_lora_bf16 | 100 | 20% |" in text
    assert "flags: avx2 yes" in text and "attune_full_bf16" in text


def test_attention_is_counted_over_each_documents_own_length():
    # a token of a causal document of L tokens attends L / 2 keys on average: T = L
    assert attended_span([64]) == 64
    assert attended_span([2, 4]) == pytest.approx((2 * 2 + 4 * 4) / 6)
    with pytest.raises(ValueError, match="no tokens"):
        attended_span([])


def test_the_harness_adds_flops_and_mfu_from_the_runs_config(tmp_path, checkpoint):
    config = {
        "model": {"path": str(checkpoint)},
        "tokenizer": {"_component_": "attune.tokenizer.from_pretrained", "path": str(checkpoint)},
        "dataset": {
            "_component_": "attune.demo.reverse_words_dataset",
            "max_seq_len": 32,
            "cache_dir": str(tmp_path / "hf_cache"),
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    lengths = data_lengths(config)
    # the lengths are the examples' as the recipe reads them
    from attune.config import instantiate
    from attune.tokenizer import from_pretrained

    examples = instantiate(config["dataset"], tokenizer=from_pretrained(checkpoint))
    assert lengths == [len(examples[i]["tokens"]) for i in range(len(examples))]
    span = attended_span(lengths)
    assert 1 < span <= 32 and max(lengths) <= 32
    model_config = json.loads((checkpoint / "config.json").read_text())
    records = [{"step": 4, "tokens_seen": 256}]
    found = _flops_figures(tmp_path, records, {"tokens_per_second": 1000.0}, peak_seconds=0.2)
    assert found["flops_per_token"] == model_flops_per_token(model_config, span)
    assert found["matmul_dtype"] == "fp32"
    assert found["mfu"] == pytest.approx(
        1000.0 * found["flops_per_token"] / found["matmul_peak_flops"]
    )
    # no peak asked for: the count alone
    assert "mfu" not in _flops_figures(tmp_path, records, {"tokens_per_second": 1.0}, 0.0)


def test_an_emulated_bf16_peak_is_measured_only_when_a_run_needs_it(monkeypatch):
    import benchmarks.mfu as mfu_module

    monkeypatch.setattr(mfu_module, "has_bf16_instructions", lambda: False)
    assert mfu_module.peak_dtypes(["fp32"]) == ("fp32",)
    assert mfu_module.peak_dtypes(["fp32", "bf16"]) == ("fp32", "bf16")
    monkeypatch.setattr(mfu_module, "has_bf16_instructions", lambda: True)
    assert mfu_module.peak_dtypes(["fp32"]) == ("fp32", "bf16")
    figures = {
        "cpu": "x86_64",
        "peaks": {"fp32": 150e9, "fp32_square": 160e9},
        "dtype": "fp32",
        "tokens_per_second": 500.0,
        "flops_per_token": 180e6,
        "achieved_flops": 90e9,
        "mfu": 0.6,
        "seq_len": 242.0,
        "tokens_per_batch": 2048,
        "lora_rank": None,
    }
    text = mfu_module.report(figures)
    assert "| 150.0 (2048^3: 160.0) | not measured (emulated here) | fp32 | 500 |" in text
    assert "attended span 242" in text


def test_a_run_whose_data_is_gone_is_one_line_naming_the_fix(tmp_path, checkpoint, capsys):
    from benchmarks.mfu import main

    config = {
        "model": {"path": str(checkpoint)},
        "tokenizer": {"_component_": "attune.tokenizer.from_pretrained", "path": str(checkpoint)},
        "dataset": {
            "_component_": "attune.data.instruct_dataset",
            "source": str(tmp_path / "gone.jsonl"),
            "max_seq_len": 32,
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "gone.jsonl" in error and "--seq-len" in error and "Traceback" not in error

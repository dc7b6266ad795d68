"""Loading HF folders: sharded weights, and one clear error for each broken folder."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from attune import models
from attune.errors import CheckpointError
from tests.models.hf_reference import make_checkpoint, padded_batch


def test_sharded_checkpoint_loads_with_the_same_logits(tmp_path):
    reference = make_checkpoint("llama_gqa_untied", tmp_path / "one")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    tokens, _ = padded_batch(96)
    with torch.no_grad():
        expected = models.from_pretrained(tmp_path / "one")(tokens)
        actual = models.from_pretrained(tmp_path / "sharded")(tokens)
    assert torch.equal(actual, expected)


def test_dtype_and_tied_weights(tmp_path):
    make_checkpoint("qwen2_tied_biases", tmp_path)
    model = models.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rotary.inv_freq.dtype == torch.float32  # RoPE tables stay exact


@pytest.fixture
def folder(tmp_path):
    make_checkpoint("llama_gqa_untied", tmp_path)
    return tmp_path


def test_folder_without_weights(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights in .*: expected model.safetensors"):
        models.from_pretrained(folder)


def test_pickled_weights_are_refused(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match=r"only pickled weights \(pytorch_model.bin\)"):
        models.from_pretrained(folder)


def test_corrupt_file(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: corrupt safetensors file"):
        models.from_pretrained(folder)


def test_shape_mismatch_names_the_tensor_and_both_shapes(folder):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'model.layers.1.mlp.up_proj.weight' has shape \(100, 64\), but the config "
        r"makes it \(112, 64\)",
    ):
        models.from_pretrained(folder)


def test_missing_tensor_is_named(folder):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.norm.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"the weights lack model.norm.weight"):
        models.from_pretrained(folder)


def test_unsupported_model_type(folder):
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "lama"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"model_type 'lama' is not supported; did you mean 'llama'\?"
    ):
        models.from_pretrained(folder)


def test_no_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"no config\.json in"):
        models.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
         r"RoPE scaling 'yarn', which attune does not support yet"),
        ({"num_key_value_heads": 3}, r"config.json: num_heads \(4\) must be a multiple of num_kv_heads \(3\)"),
        ({"hidden_size": None}, r"config.json: hidden_size must be a positive integer, got None"),
    ],
)  # fmt: skip
def test_config_problems_are_checkpoint_errors(folder, change, message):
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        models.from_pretrained(folder)


def test_missing_config_field_is_named(folder):
    config = json.loads((folder / "config.json").read_text())
    del config["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"config.json of a llama model lacks 'num_hidden_layers'"
    ):
        models.from_pretrained(folder)

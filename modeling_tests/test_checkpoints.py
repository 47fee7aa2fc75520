"""Loading and saving the hub layout: sharded safetensors with an index and per-expert keys, each dtype, device_map
through accelerate, and checkpoints exchanged with transformers 5.23's built-in qwen2_moe."""

import json
import os

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from qwen2_moe_hf import Qwen2MoeForCausalLM, Qwen2MoeModel, compat

import helpers

needs_builtin = pytest.mark.skipif(
    not compat.HAS_BUILTIN_QWEN2_MOE,
    reason=f"transformers {compat.TRANSFORMERS_VERSION} has no built-in qwen2_moe to exchange checkpoints with",
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = helpers.build_model("gqa")
    path = helpers.save_checkpoint(model, str(tmp_path_factory.mktemp("ckpt")))
    return path, model


def _logits(model):
    """Logits of the parity batch at its real (non-padding) positions."""
    input_ids, attention_mask, position_ids = helpers.parity_inputs(model.config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                       position_ids=position_ids.to(model.device)).logits.float().cpu()
    return logits[attention_mask.bool()]


def test_save_writes_the_hub_layout(checkpoint):
    path, model = checkpoint
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        index = json.load(f)
    keys = set(index["weight_map"])
    assert len(set(index["weight_map"].values())) > 1, "expected several shards"
    assert keys == set(model.state_dict())
    for key in ("model.layers.0.mlp.gate.weight", "model.layers.2.mlp.experts.5.down_proj.weight",
                "model.layers.1.mlp.shared_expert_gate.weight", "model.layers.0.self_attn.q_proj.bias",
                "model.embed_tokens.weight", "lm_head.weight"):
        assert key in keys
    config = json.load(open(os.path.join(path, "config.json")))
    assert config["model_type"] == "qwen2_moe" and config["architectures"] == ["Qwen2MoeForCausalLM"]
    assert "auto_map" not in config  # nothing for trust_remote_code to fetch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_from_pretrained_each_dtype(checkpoint, dtype):
    path, model = checkpoint
    loaded = AutoModelForCausalLM.from_pretrained(path, **compat.dtype_kwarg(dtype))
    assert type(loaded) is Qwen2MoeForCausalLM
    assert all(p.dtype == dtype for p in loaded.parameters())
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name].float(), tensor.to(dtype).float(), msg=name)


def test_dtype_auto_follows_the_checkpoint(tmp_path):
    model = helpers.build_model("gqa").to(torch.bfloat16)
    helpers.save_checkpoint(model, str(tmp_path))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, **compat.dtype_kwarg("auto"))
    assert loaded.dtype == torch.bfloat16


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_device_map(checkpoint, device_map):
    path, model = checkpoint
    loaded = AutoModelForCausalLM.from_pretrained(path, device_map=device_map)
    assert all(p.device.type == "cpu" for p in loaded.parameters())  # placed, none left on "meta"
    torch.testing.assert_close(_logits(loaded), _logits(model))


def test_base_model_loads_from_a_causal_lm_checkpoint(checkpoint):
    path, model = checkpoint
    base = AutoModel.from_pretrained(path)
    assert type(base) is Qwen2MoeModel
    torch.testing.assert_close(base.layers[1].mlp.experts[3].up_proj.weight,
                               model.model.layers[1].mlp.experts[3].up_proj.weight)


def test_no_split_module_is_the_decoder_layer():
    assert Qwen2MoeForCausalLM._no_split_modules == ["Qwen2MoeDecoderLayer"]


@needs_builtin
def test_builtin_loads_ours_and_we_load_the_builtins(checkpoint, tmp_path):
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeForCausalLM as Builtin

    path, model = checkpoint
    builtin = Builtin.from_pretrained(path).eval()
    torch.testing.assert_close(_logits(builtin), _logits(model), rtol=1e-5, atol=1e-5)
    builtin.save_pretrained(tmp_path, max_shard_size="200KB")
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(back) is Qwen2MoeForCausalLM
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, msg=name)

"""Faulty full-precision checkpoints: every fault raises an error naming the file or tensor, and nothing the
model needs is ever initialised at random unless the caller says so (allow_missing_weights=True)."""

import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from qwen2_moe_hf.files import CheckpointError

from helpers import build_model, save_checkpoint

EXPERT = "model.layers.1.mlp.experts.2.up_proj.weight"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(build_model("gqa", seed=2), str(tmp_path_factory.mktemp("fp")), max_shard_size="150KB")


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def _shard_of(folder, key):
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        return json.load(f)["weight_map"][key]


def _edit_shard(folder, key, edit):
    path = os.path.join(folder, _shard_of(folder, key))
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_expert_tensor_raises_instead_of_random_init(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "missing")
    _edit_shard(path, EXPERT, lambda t: t.pop(EXPERT))
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        index = json.load(f)
    del index["weight_map"][EXPERT]
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    with pytest.raises(CheckpointError, match=EXPERT.replace(".", r"\.")):
        AutoModelForCausalLM.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, allow_missing_weights=True)  # the documented opt-out
    assert model.model.layers[1].mlp.experts[2].up_proj.weight.shape == (32, 64)


def test_index_naming_a_tensor_its_shard_lacks(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "lacks")
    _edit_shard(path, EXPERT, lambda t: t.pop(EXPERT))
    with pytest.raises(CheckpointError, match=rf"has no tensor '{EXPERT}'"):
        AutoModelForCausalLM.from_pretrained(path)


def test_truncated_shard_is_named(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "truncated")
    shard = _shard_of(path, EXPERT)
    with open(os.path.join(path, shard), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(path, shard)) - 10)
    with pytest.raises(CheckpointError, match=f"{shard}: truncated"):
        AutoModelForCausalLM.from_pretrained(path)


def test_corrupt_header_is_named(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "corrupt")
    shard = _shard_of(path, EXPERT)
    with open(os.path.join(path, shard), "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage")
    with pytest.raises(CheckpointError, match=f"{shard}: corrupt safetensors header"):
        AutoModelForCausalLM.from_pretrained(path)


def test_missing_shard_is_named(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "no_shard")
    shard = _shard_of(path, EXPERT)
    os.remove(os.path.join(path, shard))
    with pytest.raises(CheckpointError, match=f"{shard}: missing"):
        AutoModelForCausalLM.from_pretrained(path)


def test_wrong_shape_is_named(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "shape")
    _edit_shard(path, EXPERT, lambda t: t.update({EXPERT: t[EXPERT][:16].contiguous()}))
    with pytest.raises(Exception, match=r"experts\.2\.up_proj"):
        AutoModelForCausalLM.from_pretrained(path)


def test_only_safetensors_unless_bin_is_allowed(tmp_path):
    model = build_model("gqa", seed=2)
    model.config.save_pretrained(str(tmp_path))  # a pickle-format checkpoint, written by hand (5.x only saves
    torch.save(model.state_dict(), os.path.join(tmp_path, "pytorch_model.bin"))  # safetensors)
    with pytest.raises(CheckpointError, match="only safetensors are read"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), use_safetensors=False)  # explicit: weights_only
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_disk_offload_with_max_memory(checkpoint, tmp_path):
    """device_map="auto" with a max_memory smaller than the model offloads layers to disk, and still computes
    the same logits."""
    reference = AutoModelForCausalLM.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map="auto", max_memory={"cpu": "300KB"},
                                                 offload_folder=str(tmp_path / "offload"))
    assert "disk" in set(model.hf_device_map.values())
    ids = torch.randint(1, 128, (1, 7))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5)


def test_non_float_tensor_is_named(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "dtype")
    _edit_shard(path, EXPERT, lambda t: t.update({EXPERT: t[EXPERT].to(torch.int32)}))
    with pytest.raises(CheckpointError, match=rf"'{EXPERT}' has dtype torch.int32"):
        AutoModelForCausalLM.from_pretrained(path)


def test_unknown_extra_tensor_warns(checkpoint, tmp_path, caplog):
    path = _copy(checkpoint, tmp_path / "extra")
    _edit_shard(path, EXPERT, lambda t: t.update({"model.layers.1.mlp.mystery.weight": torch.zeros(3)}))
    with caplog.at_level(logging.WARNING):
        AutoModelForCausalLM.from_pretrained(path)
    assert "model.layers.1.mlp.mystery.weight" in caplog.text

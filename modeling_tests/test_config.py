import json
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeForCausalLM, compat

import helpers

GPTQ_CONFIG = os.path.join(helpers.METADATA_DIR, "Qwen1.5-MoE-A2.7B-Chat-GPTQ-Int4.config.json")
needs_metadata = pytest.mark.skipif(
    not os.path.isfile(GPTQ_CONFIG), reason=f"../shared/qwen1.5-moe-metadata not found at {helpers.METADATA_DIR}"
)


def test_defaults_are_qwen15_moe_a27b():
    config = Qwen2MoeConfig()
    expected = dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, head_dim=128, num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, norm_topk_prob=False, rope_theta=1e6, rms_norm_eps=1e-6,
        decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False, tie_word_embeddings=False,
        qkv_bias=True, router_aux_loss_coef=0.001, max_position_embeddings=32768, hidden_act="silu",
    )
    assert {k: getattr(config, k) for k in expected} == expected
    assert config.layer_types == ["full_attention"] * 24
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}


@needs_metadata
def test_hub_config_in_the_439_form_loads_every_field(tmp_path):
    with open(GPTQ_CONFIG) as f:
        hub = json.load(f)
    hub.pop("quantization_config")
    (tmp_path / "config.json").write_text(json.dumps(hub))
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is Qwen2MoeConfig
    for key, value in hub.items():
        if key in ("torch_dtype", "transformers_version", "architectures", "sliding_window"):
            continue
        assert getattr(config, key) == value, key
    assert config.rope_parameters["rope_theta"] == hub["rope_theta"]
    assert compat.config_dtype(config) in (torch.float16, "float16")


def test_5x_form_loads(tmp_path):
    data = dict(
        helpers.tiny_config_kwargs(), model_type="qwen2_moe", dtype="bfloat16",
        rope_parameters={"rope_type": "default", "rope_theta": 5e5}, layer_types=["full_attention"] * 3,
    )
    (tmp_path / "config.json").write_text(json.dumps(data))
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is Qwen2MoeConfig
    assert config.rope_theta == 5e5
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 5e5}
    assert compat.config_dtype(config) in (torch.bfloat16, "bfloat16")


def test_round_trip_through_save_pretrained(tmp_path):
    config = Qwen2MoeConfig(**helpers.tiny_config_kwargs("sparse_step2_mha_norm", rope_theta=12345.0))
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    # Both spellings of the RoPE base, so 4.x and 5.x readers both find theirs.
    assert saved["rope_theta"] == 12345.0 and saved["rope_parameters"]["rope_theta"] == 12345.0
    again = AutoConfig.from_pretrained(tmp_path)
    assert type(again) is Qwen2MoeConfig
    keys = set(config.to_diff_dict()) | {"decoder_sparse_step", "norm_topk_prob", "rope_parameters", "layer_types"}
    for key in keys - {"transformers_version"}:
        assert getattr(again, key) == getattr(config, key), key


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_experts_per_tok", 7),  # top-k > experts
        ("num_experts_per_tok", 0),
        ("num_key_value_heads", 3),  # heads not divisible by KV heads
        ("hidden_size", 66),  # not a multiple of the heads
        ("hidden_size", 0),
        ("num_hidden_layers", -1),
        ("vocab_size", 1.5),
        ("moe_intermediate_size", -8),
        ("mlp_only_layers", [3]),  # outside the 3 layers
        ("decoder_sparse_step", 0),
        ("hidden_act", "swiglu9"),
        ("rms_norm_eps", 0.0),
        ("rope_theta", -1.0),
        ("rope_parameters", {"rope_type": "nope", "factor": 4.0}),
        ("rope_parameters", {"rope_type": "linear", "factor": "2"}),
        ("layer_types", ["full_attention"]),
        ("head_dim", 15),
        # types, not only ranges: a string where a bool belongs is not read as true
        ("norm_topk_prob", "false"),
        ("use_sliding_window", "yes"),
        ("qkv_bias", 1),
        ("num_experts", 2.0),
        ("initializer_range", float("inf")),
        ("router_aux_loss_coef", float("nan")),
        ("bos_token_id", "1"),
        ("mlp_only_layers", "0"),
        ("pad_token_id", 128),  # == vocab_size
        ("sliding_window", -1),
    ],
)
def test_invalid_values_raise_naming_the_field(field, value):
    kwargs = helpers.tiny_config_kwargs()
    kwargs[field] = value
    with pytest.raises(ValueError, match=field.split("_")[0]) as info:
        Qwen2MoeConfig(**kwargs)
    assert field in str(info.value) or field == "rope_parameters" and "rope_type" in str(info.value)


def test_unset_key_value_heads_mean_multi_head_attention(tmp_path):
    """Qwen2 configs from before GQA leave num_key_value_heads unset (null): one KV head per attention head, on
    every route (it was refused as "expected an integer" once validation ran first)."""
    kwargs = helpers.tiny_config_kwargs(num_key_value_heads=None)
    config = Qwen2MoeConfig(**kwargs)
    assert config.num_key_value_heads == config.num_attention_heads
    config.save_pretrained(str(tmp_path))
    with open(tmp_path / "config.json") as f:
        data = json.load(f)
    data["num_key_value_heads"] = None
    with open(tmp_path / "config.json", "w") as f:
        json.dump(data, f)
    assert Qwen2MoeConfig.from_pretrained(str(tmp_path)).num_key_value_heads == config.num_attention_heads
    with pytest.raises(ValueError, match="num_key_value_heads"):
        Qwen2MoeConfig(**dict(kwargs, num_key_value_heads=0))


BAD_VALUES = [("num_experts_per_tok", 0), ("norm_topk_prob", "false"), ("num_hidden_layers", "3"),
              ("rms_norm_eps", float("nan")), ("mlp_only_layers", [7]), ("hidden_act", None)]


@pytest.mark.parametrize("route", ["init", "config_json", "from_pretrained_kwarg", "config_from_pretrained_kwarg",
                                   "attribute_before_build", "from_dict"])
@pytest.mark.parametrize("field, value", BAD_VALUES)
def test_every_route_validates(tmp_path, route, field, value):
    """Qwen2MoeConfig(...), config.json, from_pretrained keyword arguments (model and config), from_dict, and an
    attribute changed before a model is built: each raises ValueError naming the field."""
    model = helpers.build_model("gqa")
    folder = str(tmp_path / "ckpt")
    helpers.save_checkpoint(model, folder)
    kwargs = helpers.tiny_config_kwargs()
    with pytest.raises(ValueError, match=rf"Qwen2MoeConfig\.{field}: expected"):
        if route == "init":
            Qwen2MoeConfig(**dict(kwargs, **{field: value}))
        elif route == "config_json":
            path = tmp_path / "ckpt" / "config.json"
            data = json.loads(path.read_text())
            data[field] = value
            path.write_text(json.dumps(data))
            AutoModelForCausalLM.from_pretrained(folder)
        elif route == "from_pretrained_kwarg":
            AutoModelForCausalLM.from_pretrained(folder, **{field: value})
        elif route == "config_from_pretrained_kwarg":
            AutoConfig.from_pretrained(folder, **{field: value})
        elif route == "from_dict":
            Qwen2MoeConfig.from_dict(kwargs, **{field: value})
        else:
            config = Qwen2MoeConfig(**kwargs)
            setattr(config, field, value)
            Qwen2MoeForCausalLM(config)


def test_an_unknown_moe_backend_is_refused_when_the_model_is_built():
    config = Qwen2MoeConfig(**helpers.tiny_config_kwargs())
    config.moe_backend = "bogus"
    with pytest.raises(ValueError, match="moe_backend: unknown backend 'bogus'"):
        Qwen2MoeForCausalLM(config)

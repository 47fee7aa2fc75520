"""Registration: what `import qwen2_moe_hf` maps, the override switch (argument and env), idempotency."""

import subprocess
import sys

import pytest
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

import qwen2_moe_hf
from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen2MoeForSequenceClassification, Qwen2MoeModel
from qwen2_moe_hf import compat

import helpers


@pytest.fixture(autouse=True)
def restore_registration():
    yield
    qwen2_moe_hf.register(override_builtin=True)


def test_auto_classes_resolve_to_ours():
    config = AutoConfig.for_model("qwen2_moe", **helpers.tiny_config_kwargs())
    assert type(config) is Qwen2MoeConfig
    assert type(AutoModel.from_config(config)) is Qwen2MoeModel
    assert type(AutoModelForCausalLM.from_config(config)) is Qwen2MoeForCausalLM
    assert type(AutoModelForSequenceClassification.from_config(config)) is Qwen2MoeForSequenceClassification


def test_register_is_idempotent():
    assert qwen2_moe_hf.register() is True
    assert qwen2_moe_hf.register() is True
    assert type(AutoConfig.for_model("qwen2_moe", **helpers.tiny_config_kwargs())) is Qwen2MoeConfig


def test_override_off_leaves_the_builtin_alone():
    served_by_us = qwen2_moe_hf.register(override_builtin=False)
    config = AutoConfig.for_model("qwen2_moe", **helpers.tiny_config_kwargs())
    if compat.HAS_BUILTIN_QWEN2_MOE:
        assert served_by_us is False
        assert type(config).__module__.startswith("transformers.models.qwen2_moe")
        assert type(AutoModelForCausalLM.from_config(config)).__module__.startswith("transformers.models.qwen2_moe")
    else:  # nothing to leave alone: ours is the only qwen2_moe
        assert served_by_us is True and type(config) is Qwen2MoeConfig
    assert qwen2_moe_hf.register(override_builtin=True) is True
    assert type(AutoConfig.for_model("qwen2_moe", **helpers.tiny_config_kwargs())) is Qwen2MoeConfig


@pytest.mark.parametrize("value, expect_ours", [("0", not compat.HAS_BUILTIN_QWEN2_MOE), ("1", True)])
def test_env_switch(value, expect_ours):
    code = (
        "import qwen2_moe_hf\n"
        "from transformers import AutoConfig\n"
        "print(type(AutoConfig.for_model('qwen2_moe')).__module__)\n"
    )
    env = dict(__import__("os").environ, QWEN2_MOE_HF_OVERRIDE=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("qwen2_moe_hf") == expect_ours


def test_bad_env_value_is_refused(monkeypatch):
    monkeypatch.setenv("QWEN2_MOE_HF_OVERRIDE", "maybe")
    with pytest.raises(ValueError, match="QWEN2_MOE_HF_OVERRIDE"):
        qwen2_moe_hf.register()


def test_checkpoint_loads_without_trust_remote_code(tmp_path):
    helpers.save_checkpoint(helpers.build_model("gqa"), str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=False)
    assert type(model) is Qwen2MoeForCausalLM

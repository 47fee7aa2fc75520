"""Registration with transformers' Auto classes, and the tokenizer's ChatML default.

`register()` runs on `import qwen2_moe_hf`. It maps model_type "qwen2_moe" to our config, and our config to our
models and to Qwen2's tokenizers. Where transformers ships its own qwen2_moe (4.40+), ours replaces it in the Auto
mappings unless `override_builtin=False` or env QWEN2_MOE_HF_OVERRIDE=0. Calling it again is harmless; calling it
with the other switch value undoes the override. No `trust_remote_code` is ever involved.
"""

import json
import logging
import os
from typing import Any, Dict, Optional, Union

import transformers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import cached_file

from . import compat
from .configuration_qwen2_moe import Qwen2MoeConfig
from .modeling_qwen2_moe import (
    Qwen2MoeForCausalLM,
    Qwen2MoeForQuestionAnswering,
    Qwen2MoeForSequenceClassification,
    Qwen2MoeForTokenClassification,
    Qwen2MoeModel,
)

logger = logging.getLogger("qwen2_moe_hf")

MODEL_TYPE = "qwen2_moe"
ENV_OVERRIDE = "QWEN2_MOE_HF_OVERRIDE"

# The Qwen1.5 chat template (ChatML), used when a qwen2_moe checkpoint's tokenizer_config has none.
QWEN_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_state = {"override": None}


def _env_override_default() -> bool:
    value = os.environ.get(ENV_OVERRIDE, "1").strip().lower()
    if value not in ("0", "1", "false", "true", "no", "yes", "off", "on"):
        raise ValueError(f"{ENV_OVERRIDE}: expected 0 or 1, got {value!r}")
    return value in ("1", "true", "yes", "on")


def register(override_builtin: Optional[bool] = None) -> bool:
    """Register qwen2_moe with AutoConfig / AutoModel / AutoModelForCausalLM / AutoModelForSequenceClassification /
    AutoModelForTokenClassification / AutoModelForQuestionAnswering / AutoTokenizer. Returns whether our classes now
    serve model_type "qwen2_moe"."""
    if override_builtin is None:
        override_builtin = _env_override_default()
    ours_serve = override_builtin or not compat.HAS_BUILTIN_QWEN2_MOE

    # Our config class -> our models. Keyed by the class object, so it never shadows transformers' own config.
    for auto_class, model_class in (
        (AutoModel, Qwen2MoeModel),
        (AutoModelForCausalLM, Qwen2MoeForCausalLM),
        (AutoModelForSequenceClassification, Qwen2MoeForSequenceClassification),
        (AutoModelForTokenClassification, Qwen2MoeForTokenClassification),
        (AutoModelForQuestionAnswering, Qwen2MoeForQuestionAnswering),
    ):
        auto_class.register(Qwen2MoeConfig, model_class, exist_ok=True)
    _register_tokenizer()

    # model_type "qwen2_moe" -> our config (that is what routes from_pretrained to our models), or back.
    extra = CONFIG_MAPPING._extra_content
    if ours_serve:
        AutoConfig.register(MODEL_TYPE, Qwen2MoeConfig, exist_ok=True)
    elif extra.get(MODEL_TYPE) is Qwen2MoeConfig:
        del extra[MODEL_TYPE]
    _patch_tokenizer_chat_template()
    _state["override"] = ours_serve
    return ours_serve


def _register_tokenizer() -> None:
    slow = getattr(transformers, "Qwen2Tokenizer", None)
    fast = getattr(transformers, "Qwen2TokenizerFast", None)
    if compat.IS_V5:
        AutoTokenizer.register(Qwen2MoeConfig, tokenizer_class=fast or slow, exist_ok=True)
    else:
        AutoTokenizer.register(Qwen2MoeConfig, slow_tokenizer_class=slow, fast_tokenizer_class=fast, exist_ok=True)


def _is_qwen2_moe_checkpoint(path: str, kwargs: Dict[str, Any]) -> bool:
    """Whether `path` (folder or hub id) holds a config.json of model_type qwen2_moe. Never raises."""
    try:
        if os.path.isdir(path):
            config_file = os.path.join(path, "config.json")
        else:
            hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
            config_file = cached_file(path, "config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if not config_file or not os.path.isfile(config_file):
            return False
        with open(config_file, encoding="utf-8") as f:
            return json.load(f).get("model_type") == MODEL_TYPE
    except Exception:  # a tokenizer must still load when its model's config cannot be read
        return False


def _patch_tokenizer_chat_template() -> None:
    """AutoTokenizer.from_pretrained: give qwen2_moe tokenizers without a chat_template the Qwen ChatML one."""
    original = AutoTokenizer.from_pretrained
    if getattr(original, "_qwen2_moe_hf", False):
        return
    original_func = original.__func__

    def from_pretrained(cls: type, pretrained_model_name_or_path: Union[str, os.PathLike], *inputs: Any,
                        **kwargs: Any) -> Any:
        tokenizer = original_func(cls, pretrained_model_name_or_path, *inputs, **kwargs)
        if (
            _state["override"]
            and getattr(tokenizer, "chat_template", None) is None
            and _is_qwen2_moe_checkpoint(str(pretrained_model_name_or_path), kwargs)
        ):
            tokenizer.chat_template = QWEN_CHATML_TEMPLATE
        return tokenizer

    from_pretrained._qwen2_moe_hf = True
    from_pretrained.__doc__ = original_func.__doc__
    AutoTokenizer.from_pretrained = classmethod(from_pretrained)

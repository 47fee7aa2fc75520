"""qwen2_moe_hf: Qwen1.5-MoE (model_type `qwen2_moe`) for Hugging Face transformers 4.38.2 ... 5.x.

`import qwen2_moe_hf` registers the model with the Auto classes (see registration.py); after that the release
post's `AutoModelForCausalLM.from_pretrained(...)` / `AutoTokenizer.from_pretrained(...)` code works unchanged.
"""

from . import compat
from .configuration_qwen2_moe import Qwen2MoeConfig
from .modeling_qwen2_moe import (
    Qwen2MoeForCausalLM,
    Qwen2MoeForQuestionAnswering,
    Qwen2MoeForSequenceClassification,
    Qwen2MoeForTokenClassification,
    Qwen2MoeModel,
    Qwen2MoePreTrainedModel,
    Qwen2MoeSparseMoeBlock,
    load_balancing_loss_func,
)
from .moe import env_report
from .registration import QWEN_CHATML_TEMPLATE, register

__version__ = "0.1.0"

compat.plugin_logger()  # our warnings follow transformers' verbosity
register()

__all__ = [
    "QWEN_CHATML_TEMPLATE",
    "Qwen2MoeConfig",
    "Qwen2MoeForCausalLM",
    "Qwen2MoeForQuestionAnswering",
    "Qwen2MoeForSequenceClassification",
    "Qwen2MoeForTokenClassification",
    "Qwen2MoeModel",
    "Qwen2MoePreTrainedModel",
    "Qwen2MoeSparseMoeBlock",
    "env_report",
    "load_balancing_loss_func",
    "register",
]

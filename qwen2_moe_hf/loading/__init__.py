"""Loading checkpoints: the one load plan (plan.py), with quantization formats plugged in as hooks (gptq/hooks.py).
Reading the files themselves is files.py's."""

from .plan import check_against_model, from_pretrained, key_mapping

__all__ = ["check_against_model", "from_pretrained", "key_mapping"]

"""Loading checkpoints: the one load plan (plan.py), with quantization formats plugged in as hooks (gptq/hooks.py).
Reading the files themselves is files.py's. Saving goes through transformers' save_pretrained, with the layouts a
load made for the kernels put back for it (checkpoint_layout)."""

from ..gptq.linear import checkpoint_layout
from .plan import check_against_model, from_pretrained, key_mapping

__all__ = ["check_against_model", "checkpoint_layout", "from_pretrained", "key_mapping"]

"""One rank of test_devices.py's tensor-parallel check; torchrun runs it, pytest does not collect it:

    torchrun --standalone --nproc-per-node 2 modeling_tests/tp_worker.py CHECKPOINT OUT_DIR DTYPES NEW_TOKENS

For each dtype of DTYPES (comma-separated torch dtype names) it loads CHECKPOINT with
`from_pretrained(..., tp_plan="auto")` (gloo on CPU), runs helpers.parity_inputs' left-padded batch once for the
logits and once through greedy generate, and writes OUT_DIR/{dtype}_rank{RANK}.pt: the logits (fp32), the new
tokens, the local shape of every parameter that came out sharded (a DTensor), and the backend each MoE layer's
experts resolve to."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import helpers  # noqa: E402


def run(checkpoint: str, out_dir: str, dtype_name: str, new_tokens: int) -> None:
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from qwen2_moe_hf import compat
    from qwen2_moe_hf.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    dtype = getattr(torch, dtype_name)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, tp_plan="auto", **compat.dtype_kwarg(dtype)).eval()
    sharded = {name: list(p.to_local().shape) for name, p in model.named_parameters() if isinstance(p, DTensor)}
    ids, mask, positions = helpers.parity_inputs(model.config.vocab_size)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=positions).logits.float()
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   do_sample=False, pad_token_id=0, eos_token_id=None)
    x = torch.zeros(1, model.config.hidden_size, dtype=dtype)
    backends = {name: helpers.resolved_backend(module, x) for name, module in model.named_modules()
                if isinstance(module, Qwen2MoeSparseMoeBlock)}
    rank = torch.distributed.get_rank()
    torch.save({"logits": logits, "generated": generated[:, ids.shape[1]:].contiguous(), "sharded": sharded,
                "backends": backends, "world_size": torch.distributed.get_world_size()},
               os.path.join(out_dir, f"{dtype_name}_rank{rank}.pt"))


def main(checkpoint: str, out_dir: str, dtypes: str, new_tokens: int) -> None:
    import qwen2_moe_hf  # noqa: F401  (registers the classes with the Auto classes)

    try:
        for dtype_name in dtypes.split(","):
            run(checkpoint, out_dir, dtype_name, new_tokens)
        torch.distributed.barrier()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))

"""The schemas of the package's custom ops (namespace `qwen2_moe_hf`), defined once for every device.

The C++ files in csrc/ only register implementations (CPU in csrc/cpu, CUDA in csrc/cuda); the shape functions
here let torch.compile and CUDA-graph capture trace through the ops without running them. Contracts are spelled
out in csrc/cpu/moe_ops_cpu.cpp and csrc/cpu/moe_ffn_cpu.cpp.
"""

import torch

LIB = "qwen2_moe_hf"

SCHEMAS = {
    "topk_softmax": "(Tensor logits, int k, bool renormalize) -> (Tensor, Tensor)",
    "moe_align": "(Tensor ids, int num_experts, int block) -> (Tensor, Tensor, Tensor)",
    "moe_combine": "(Tensor expert_out, Tensor weights, Tensor? shared_out, Tensor? shared_gate) -> Tensor",
    "moe_ffn_cpu": "(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor[] w_gate, Tensor[] w_up, "
    "Tensor[] w_down, Tensor? shared_gate, Tensor? shared_up, Tensor? shared_down, Tensor? shared_expert_gate) "
    "-> Tensor",
    # moe_ffn_cpu with the router's softmax / top-k done inside, from the router logits: one call per layer.
    "moe_block_cpu": "(Tensor x, Tensor router_logits, int top_k, bool renormalize, Tensor[] w_gate, Tensor[] w_up, "
    "Tensor[] w_down, Tensor? shared_gate, Tensor? shared_up, Tensor? shared_down, Tensor? shared_expert_gate) "
    "-> Tensor",
}


def _define():
    for name, schema in SCHEMAS.items():
        if not hasattr(getattr(torch.ops, LIB), name):
            torch.library.define(f"{LIB}::{name}", schema)

    @torch.library.register_fake(f"{LIB}::topk_softmax")
    def _(logits, k, renormalize):
        return logits.new_empty(logits.shape[0], k, dtype=torch.float32), logits.new_empty(
            logits.shape[0], k, dtype=torch.long)

    @torch.library.register_fake(f"{LIB}::moe_align")
    def _(ids, num_experts, block):
        # The padded length depends on the routing: a data-dependent size.
        ctx = torch.library.get_ctx()
        padded = ctx.new_dynamic_size()
        blocks = ctx.new_dynamic_size()
        return (ids.new_empty(padded, dtype=torch.int32), ids.new_empty(blocks, dtype=torch.int32),
                ids.new_empty(num_experts + 1, dtype=torch.int32))

    @torch.library.register_fake(f"{LIB}::moe_combine")
    def _(expert_out, weights, shared_out, shared_gate):
        return expert_out.new_empty(weights.shape[0], expert_out.shape[1])

    @torch.library.register_fake(f"{LIB}::moe_ffn_cpu")
    def _(x, *args):
        return torch.empty_like(x)

    @torch.library.register_fake(f"{LIB}::moe_block_cpu")
    def _(x, *args):
        return torch.empty_like(x)


_define()

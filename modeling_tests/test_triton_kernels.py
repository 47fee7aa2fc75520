"""The dense variants of the Triton kernel family (qwen2_moe_hf/kernels/triton_moe.py: INT4=False) under
TRITON_INTERPRET=1 (CPU), fp16 and fp32, against the torch reference. Triton's
interpreter reads bf16 wrongly (../shared/NOTES.md), so bf16 is left to the GPU suite."""

import os

import pytest
import torch

from helpers import row_error

# conftest.py sets TRITON_INTERPRET=1 before anything imports triton when there is no GPU.
triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e .[triton])")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

from qwen2_moe_hf.kernels import triton_moe  # noqa: E402
from qwen2_moe_hf.moe import experts_forward_reference, route  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-2}


class _Expert(torch.nn.Module):
    def __init__(self, hidden, inter, gen):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=False)
        self.act_fn = torch.nn.SiLU()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _case(tokens, experts, k, hidden, inter, dtype, seed=0, ids=None):
    gen = torch.Generator().manual_seed(seed)
    bank = torch.nn.ModuleList([_Expert(hidden, inter, gen) for _ in range(experts)]).to(DEVICE, dtype)
    x = torch.randn(tokens, hidden, generator=gen).to(DEVICE, dtype)
    logits = torch.randn(tokens, experts, generator=gen).to(DEVICE)
    weights, topk = route(logits, k, False)
    if ids is not None:
        topk = ids.to(DEVICE)
    return bank, x, topk, weights.to(dtype)


def _check(bank, x, ids, weights, dtype, **kw):
    tables = triton_moe.expert_tables([e.gate_proj.weight for e in bank], [e.up_proj.weight for e in bank],
                                      [e.down_proj.weight for e in bank], int4=False)
    got = triton_moe.routed_experts(x, ids, weights, tables, **kw)
    with torch.no_grad():
        ref = experts_forward_reference(x.float(), ids, weights.float(), bank.float())
    err = row_error(got, ref)
    assert err <= TOL[dtype], f"per-row relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens", [1, 3, 21])  # 1 and 3: the decode path; 21: sorted, grouped GEMMs
def test_routed_experts_match_reference(dtype, tokens):
    bank, x, ids, weights = _case(tokens, experts=5, k=2, hidden=48, inter=40, dtype=dtype, seed=tokens)
    _check(bank, x, ids, weights, dtype)


@pytest.mark.parametrize("path", ["decode", "grouped"])
def test_corner_cases(path):
    kw = dict(decode_max_tokens=64 if path == "decode" else 0)
    dtype = torch.float32
    bank, x, ids, weights = _case(9, experts=6, k=2, hidden=32, inter=24, dtype=dtype,
                                  ids=torch.tensor([[3, 3]] * 9))  # all slots on one expert
    _check(bank, x, ids, weights, dtype, **kw)
    bank, x, ids, weights = _case(7, experts=6, k=2, hidden=32, inter=24, dtype=dtype,
                                  ids=torch.tensor([[0, 5]] * 7))  # experts 1-4 idle
    _check(bank, x, ids, weights, dtype, **kw)


def test_align_matches_the_cpu_op_contract():
    ids = torch.randint(0, 7, (19, 3), generator=torch.Generator().manual_seed(0))
    sorted_slots, block_experts = triton_moe.align_torch(ids, 7, 16)
    from qwen2_moe_hf.kernels.build import load_cpu_ops

    ok, why = load_cpu_ops()
    if not ok:
        pytest.skip(f"CPU ops unavailable: {why}")
    ref_slots, ref_blocks, _ = torch.ops.qwen2_moe_hf.moe_align(ids, 7, 16)
    assert torch.equal(sorted_slots.cpu(), ref_slots) and torch.equal(block_experts.cpu(), ref_blocks)


def test_dense_tables_check_their_weights():
    bank, x, ids, weights = _case(3, experts=3, k=2, hidden=32, inter=24, dtype=torch.float32)
    gate, up, down = ([getattr(e, p).weight for e in bank] for p in ("gate_proj", "up_proj", "down_proj"))
    with pytest.raises(ValueError, match=r"^up\[1\]: shapes"):
        triton_moe.expert_tables(gate, up[:1] + [up[1][:, :16].contiguous()] + up[2:], down, int4=False)
    with pytest.raises(ValueError, match=r"^down\[0\]: expected a contiguous"):
        triton_moe.expert_tables(gate, up, [down[0].t()] + down[1:], int4=False)
    with pytest.raises(ValueError, match=r"^down: shapes"):
        triton_moe.expert_tables(gate, up, [g.t().contiguous()[:16] for g in gate], int4=False)
    tables = triton_moe.expert_tables(gate, up, down, int4=False)
    with pytest.raises(ValueError, match=r"^x: dtype torch.float16"):
        triton_moe.routed_experts(x.half(), ids, weights.half(), tables)

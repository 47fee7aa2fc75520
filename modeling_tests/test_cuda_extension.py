"""The CUDA expert-dispatch extension builds (sm_80 + sm_90) and loads without a GPU; with a GPU its ops match
their CPU twins. The build needs a CUDA build of torch and nvcc: the `cuda-build` stack of run_all.sh has both."""

import pytest
import torch

from qwen2_moe_hf.kernels.build import load_cuda_ops

pytestmark = pytest.mark.skipif(
    torch.version.cuda is None,
    reason=f"torch {torch.__version__} is a CPU build; the cuda-build stack (torch 2.14.1) compiles the extension",
)


def test_cuda_extension_builds_and_registers_its_ops():
    ok, why = load_cuda_ops()
    assert ok, why
    for op in ("topk_softmax", "moe_align", "moe_combine"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"qwen2_moe_hf::{op}", "CUDA"), op


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device to run the ops on")
def test_cuda_ops_match_cpu_twins():
    from qwen2_moe_hf.kernels.build import load_cpu_ops

    assert load_cpu_ops()[0] and load_cuda_ops()[0]
    ops = torch.ops.qwen2_moe_hf
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 60, generator=gen)
    logits[3, [5, 9]] = 10.0  # a tie
    for renorm in (False, True):
        w_cpu, i_cpu = ops.topk_softmax(logits, 4, renorm)
        w_gpu, i_gpu = ops.topk_softmax(logits.cuda().bfloat16().float(), 4, renorm)
        assert torch.equal(ops.topk_softmax(logits.cuda(), 4, renorm)[1].cpu(), i_cpu)
        torch.testing.assert_close(ops.topk_softmax(logits.cuda(), 4, renorm)[0].cpu(), w_cpu)
    ids = torch.randint(0, 60, (37, 4), generator=gen)
    for block in (1, 16, 64):
        cpu = ops.moe_align(ids, 60, block)
        gpu = ops.moe_align(ids.cuda(), 60, block)
        for a, b in zip(cpu, gpu):
            assert torch.equal(a, b.cpu())
    expert_out = torch.randn(37 * 4, 96, generator=gen)
    weights = torch.rand(37, 4, generator=gen)
    shared, gate = torch.randn(37, 96, generator=gen), torch.randn(37, 1, generator=gen)
    torch.testing.assert_close(
        ops.moe_combine(expert_out.cuda(), weights.cuda(), shared.cuda(), gate.cuda()).cpu(),
        ops.moe_combine(expert_out, weights, shared, gate), rtol=1e-5, atol=1e-5)

import os

import pytest

# Triton reads TRITON_INTERPRET when it is first imported; without a GPU its kernels can only run interpreted.
if os.environ.get("TRITON_INTERPRET") is None:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass


def pytest_configure(config):
    """On the stacks where the CPU ops are expected (run_all.sh sets QWEN2_MOE_HF_REQUIRE_CPU_OPS=1), a failed build
    fails the run: otherwise every test that needs them would skip and the run would pass without the fast path."""
    if os.environ.get("QWEN2_MOE_HF_REQUIRE_CPU_OPS") == "1":
        from qwen2_moe_hf.kernels.build import load_cpu_ops

        ok, why = load_cpu_ops()
        if not ok:
            raise pytest.UsageError(f"QWEN2_MOE_HF_REQUIRE_CPU_OPS=1, but the CPU ops are unavailable: {why}")

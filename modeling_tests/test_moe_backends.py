"""Every registered expert-dispatch backend against the torch reference (the oracle), on random inputs across odd
shapes and dtypes, plus the registry's rules and training through the MoE block. Each backend's cases are collected
everywhere and skip, with the backend's own reason, where it cannot run; a case puts the block and its inputs on the
backend's device (helpers.backend_device) and compares the results, back on the CPU, with the reference computed
there."""

import copy
import logging
import os
import subprocess
import sys

import pytest
import torch

import qwen2_moe_hf
from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock
from qwen2_moe_hf.moe import experts_forward_reference, requested_backend, resolve
from qwen2_moe_hf.moe.backends import registry

import helpers

FAST = [name for name, state in qwen2_moe_hf.env_report().items() if state == "available" and name != "torch"]
# Every registered backend but the reference, each skipping with its own reason where it cannot run.
BACKENDS = helpers.backend_params()
# Per row: fp32 sums in another order; bf16/fp16 are compared with the reference run in fp32 on the same (rounded)
# weights, so the bound is the low-precision rounding of the inputs.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _block(hidden=45, experts=7, top_k=3, inter=37, shared=53, seed=0, norm=False):
    config = Qwen2MoeConfig(**helpers.tiny_config_kwargs(
        hidden_size=hidden, num_attention_heads=1, num_key_value_heads=1, head_dim=8,
        num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=inter,
        shared_expert_intermediate_size=shared, norm_topk_prob=norm))
    return helpers.randomize_(Qwen2MoeSparseMoeBlock(config), seed).eval()


def _routed_reference_fp32(block, x, weights, ids):
    ref = copy.deepcopy(block).float()
    with torch.no_grad():
        return experts_forward_reference(x.reshape(-1, x.shape[-1]).float(), ids, weights.float(), ref.experts)


def _assert_close(got, expected, dtype, what):
    err = helpers.row_error(got, expected)
    assert err <= TOL[dtype], f"{what}: per-row relative error {err:.2e} > {TOL[dtype]:.0e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 3, 17, 64])
@pytest.mark.parametrize("whole_block", [True, False])
def test_backend_matches_reference(backend, dtype, tokens, whole_block):
    """The whole block (router, routed and shared experts: a fused lane where the backend has one) or its routed
    experts alone, on the backend's device, against the reference in fp32 on the CPU on the same rounded weights
    and routing."""
    ref_block = _block(seed=tokens).to(dtype)
    x = torch.randn(1, tokens, 45).to(dtype)
    device = helpers.backend_device(backend)
    block, x_dev = helpers.on_device(device, copy.deepcopy(ref_block), x)
    block.config.moe_backend = backend
    if whole_block:
        with torch.no_grad():
            got, logits = block(x_dev, return_router_logits=True)
        assert got.device.type == device.type
        _assert_close(got.reshape(-1, 45).cpu(), helpers.block_reference(ref_block, x, logits.cpu()), dtype,
                      f"{backend} block")
    else:
        got, (weights, ids) = helpers.routed(block, x_dev, backend)
        assert got.device.type == device.type
        _assert_close(got.cpu(), _routed_reference_fp32(ref_block, x, weights.cpu(), ids.cpu()), dtype,
                      f"{backend} routed")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["all_on_one_expert", "ties", "one_token", "idle_experts", "many_rows",
                                  "rows_for_sgemm"])
def test_backend_routing_corner_cases(backend, case):
    block = _block(hidden=40, experts=9, top_k=2, inter=24, shared=16, seed=11)
    # many_rows: ~44 rows per expert (the cpu backend's register-blocked path); rows_for_sgemm: 800 rows on one
    # expert, past the cpu backend's switch to a widened weight and MKL (768 rows).
    tokens = {"one_token": 1, "many_rows": 200, "rows_for_sgemm": 400}.get(case, 33)
    x = torch.randn(1, tokens, 40)
    ids = None
    if case in ("all_on_one_expert", "rows_for_sgemm"):  # every token's both slots on expert 4: 2T rows there
        ids = torch.full((tokens, 2), 4, dtype=torch.long)
    elif case == "ties":  # a zero router: all logits equal, the tie rule picks
        with torch.no_grad():
            block.gate.weight.zero_()
    elif case == "idle_experts":  # only experts 0 and 8 get tokens
        ids = torch.tensor([[0, 8]] * tokens)
    device = helpers.backend_device(backend)
    on_backend, x_dev, ids_dev = helpers.on_device(device, copy.deepcopy(block), x, ids)
    got, (_, used_ids) = helpers.routed(on_backend, x_dev, backend, topk_ids=ids_dev)
    expected, _ = helpers.routed(block, x, "torch", topk_ids=used_ids.cpu())
    _assert_close(got.cpu(), expected, torch.float32, f"{backend} {case}")


@pytest.mark.skipif("cpu" not in FAST, reason=str(helpers.backend_skip_reason("cpu")))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("hidden", [46, 45])
@pytest.mark.parametrize("rows", [5, 8, 9, 16, 17, 40])
def test_cpu_op_row_regimes(dtype, hidden, rows):
    """The CPU op's register-blocked kernels (5+ rows per expert): x in blocks of 8 or 16 rows, weights in tiles
    of 4 rows (bf16 read in place, even K only) or 6 (widened), then 2- and 1-row leftovers; hidden 46 / 45 gives
    even and odd K for gate/up, inter 30 and shared 22 leave leftover rows in every tile size. Every token on
    expert 1: `rows` rows there and on the shared expert (which the op computes beside the routed ones)."""
    block = _block(hidden=hidden, experts=3, top_k=1, inter=30, shared=22, seed=rows).to(dtype)
    x = torch.randn(rows, hidden).to(dtype)
    ids = torch.ones(rows, 1, dtype=torch.long)
    weights = torch.rand(rows, 1).to(dtype)
    e, s = block.experts, block.shared_expert
    with torch.no_grad():
        got = torch.ops.qwen2_moe_hf.moe_ffn_cpu(
            x, ids, weights, [m.gate_proj.weight for m in e], [m.up_proj.weight for m in e],
            [m.down_proj.weight for m in e], s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight,
            block.shared_expert_gate.weight)
        ref = copy.deepcopy(block).float()
        xf = x.float()
        want = experts_forward_reference(xf, ids, weights.float(), ref.experts)
        want = want + torch.sigmoid(ref.shared_expert_gate(xf)) * ref.shared_expert(xf)
    _assert_close(got, want, dtype, f"cpu {dtype} hidden={hidden} rows={rows}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_handles_nan_inputs_without_crashing(backend):
    device = helpers.backend_device(backend)
    x = torch.randn(1, 4, 45)
    x[0, 1, 3] = float("nan")
    block, x, ids = helpers.on_device(device, _block(), x, torch.tensor([[0, 1, 2]] * 4))
    block.config.moe_backend = backend
    with torch.no_grad():
        got = block(x)[0].cpu()
        routed, _ = helpers.routed(block, x, backend, topk_ids=ids)
        routed = routed.cpu()
    for out in (got, routed):
        assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2, 3]]).all()


def test_registry_rules(monkeypatch, caplog):
    block = _block()
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        requested_backend("nope")
    with pytest.raises(ValueError, match="moe_backend: the 'cuda' backend was removed .* use 'triton'"):
        requested_backend("cuda")  # a config saved when it existed gets told what replaced it
    monkeypatch.setenv(registry.ENV_BACKEND, "torch")
    assert requested_backend(None) == "torch"
    assert requested_backend("cpu") == "cpu"  # the model's own setting wins over the environment
    # A named backend that cannot run these inputs says so.
    weights = block.experts.prepared_weights()
    cpu, f64 = torch.device("cpu"), torch.float64
    if "cpu" in FAST:
        with pytest.raises(RuntimeError, match="moe_backend 'cpu' cannot run here: dtype torch.float64"):
            resolve("cpu", weights, cpu, f64)
    # auto falls back, with one log line per reason; the choice is kept in the prepared weights.
    caplog.set_level(logging.INFO, logger="qwen2_moe_hf")
    registry._logged.clear()
    for _ in range(3):
        block.experts.prepared_weights().__dict__["_caches"].clear()
        assert resolve("auto", weights, cpu, f64).name == "torch"
    report = qwen2_moe_hf.env_report()
    assert len([r for r in caplog.records if "skipped" in r.getMessage()]) == len(report) - 1
    assert report["torch"] == "available" and all(v == "available" or v.startswith("unavailable: ") for v in
                                                   report.values())
    with pytest.raises(ValueError, match="cannot be removed"):
        registry.unregister_backend("torch")


def test_from_pretrained_moe_backend_and_env(tmp_path):
    helpers.save_checkpoint(helpers.build_model("gqa"), str(tmp_path))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path, moe_backend="torch")
    assert model.config.moe_backend == "torch"
    code = ("import qwen2_moe_hf, torch\nfrom transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
            "m(torch.tensor([[1, 2, 3]]))\n")
    env = dict(os.environ, QWEN2_MOE_HF_MOE_BACKEND="nope")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "unknown backend 'nope'" in out.stderr


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
def test_gradients_equal_the_reference(backend):
    """With autograd on, every backend gives the reference's gradients (fast ones hand such calls to it): both
    run on the backend's device, compared on the CPU."""
    grads = []
    device = helpers.backend_device(backend)
    inputs = torch.randn(2, 5, 45)
    for name in ("torch", backend):
        block, x = helpers.on_device(device, _block(seed=5), inputs.clone())
        block.config.moe_backend = name
        x.requires_grad_(True)
        block(x).pow(2).sum().backward()
        grads.append([x.grad.cpu()] + [p.grad.cpu() for p in block.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_lora_style_fine_tuning_lowers_the_loss():
    """Frozen base, low-rank adapters on q/v and the experts' down projections: the loss must fall."""
    torch.manual_seed(0)
    model = helpers.build_model("gqa")
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)

    class LoRA(torch.nn.Module):
        def __init__(self, base, rank=4):
            super().__init__()
            self.base = base
            self.a = torch.nn.Parameter(torch.randn(rank, base.in_features) * 0.01)
            self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank))

        def forward(self, x):
            return self.base(x) + (x @ self.a.t()) @ self.b.t()

    adapters = []
    for layer in model.model.layers:
        for name in ("q_proj", "v_proj"):
            setattr(layer.self_attn, name, LoRA(getattr(layer.self_attn, name)))
            adapters.append(getattr(layer.self_attn, name))
        for expert in layer.mlp.experts:
            expert.down_proj = LoRA(expert.down_proj)
            adapters.append(expert.down_proj)
    params = [p for a in adapters for p in (a.a, a.b)]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(1, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids, output_router_logits=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_cli_env_reports_backends():
    out = subprocess.run([sys.executable, "-m", "qwen2_moe_hf.cli", "env"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for name, state in qwen2_moe_hf.env_report().items():
        assert f"{name}" in out.stdout and state.split(":")[0] in out.stdout

"""Every expert-dispatch backend that runs here against the torch reference (the oracle), on random inputs across
odd shapes and dtypes, plus the registry's rules and training through the MoE block."""

import logging
import os
import subprocess
import sys

import pytest
import torch

import qwen2_moe_hf
from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock
from qwen2_moe_hf.moe import dispatch, moe_forward, moe_forward_reference, route

import helpers

FAST = [name for name, state in qwen2_moe_hf.env_report().items() if state == "available" and name != "torch"]
# Relative to the output's largest magnitude: fp32 sums in another order; bf16/fp16 are compared with the
# reference run in fp32 on the same (rounded) weights, so the bound is the low-precision rounding of the inputs.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _block(hidden=45, experts=7, top_k=3, inter=37, shared=53, seed=0, norm=False):
    config = Qwen2MoeConfig(**helpers.tiny_config_kwargs(
        hidden_size=hidden, num_attention_heads=1, num_key_value_heads=1, head_dim=8,
        num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=inter,
        shared_expert_intermediate_size=shared, norm_topk_prob=norm))
    return helpers.randomize_(Qwen2MoeSparseMoeBlock(config), seed).eval()


def _run(block, x, topk_ids=None, backend="torch", with_shared=True):
    flat = x.reshape(-1, x.shape[-1])
    weights, ids = route(block.gate(flat), block.top_k, block.norm_topk_prob)
    if topk_ids is not None:
        ids = topk_ids
    shared = (block.shared_expert, block.shared_expert_gate) if with_shared else (None, None)
    with torch.no_grad():
        return moe_forward(flat, ids, weights, block.experts, *shared, backend=backend), (weights, ids)


def _reference_fp32(block, x, weights, ids, with_shared=True):
    ref = _block_like(block).float()
    shared = (ref.shared_expert, ref.shared_expert_gate) if with_shared else (None, None)
    with torch.no_grad():
        return moe_forward_reference(x.reshape(-1, x.shape[-1]).float(), ids, weights.float(), ref.experts, *shared)


def _block_like(block):
    import copy

    return copy.deepcopy(block)


def _assert_close(got, expected, dtype, what):
    err = helpers.row_error(got, expected)
    assert err <= TOL[dtype], f"{what}: per-row relative error {err:.2e} > {TOL[dtype]:.0e}"


needs_fast = pytest.mark.skipif(not FAST, reason=f"no optimized backend runs here: {qwen2_moe_hf.env_report()}")


@needs_fast
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 3, 17, 64])
@pytest.mark.parametrize("with_shared", [True, False])
def test_backend_matches_reference(backend, dtype, tokens, with_shared):
    block = _block(seed=tokens).to(dtype)
    x = torch.randn(1, tokens, 45).to(dtype)
    got, (weights, ids) = _run(block, x, backend=backend, with_shared=with_shared)
    assert got.dtype == dtype and got.shape == (tokens, 45)
    _assert_close(got, _reference_fp32(block, x, weights, ids, with_shared), dtype, f"{backend} {dtype} T={tokens}")


@needs_fast
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("case", ["all_on_one_expert", "ties", "one_token", "idle_experts", "many_rows",
                                  "rows_for_sgemm"])
def test_backend_routing_corner_cases(backend, case):
    block = _block(hidden=40, experts=9, top_k=2, inter=24, shared=16, seed=11)
    # many_rows: ~44 rows per expert (the cpu backend's register-blocked path); rows_for_sgemm: 800 rows on one
    # expert and 400 on the shared one, past the cpu backend's switch to a widened weight and MKL (768 rows).
    tokens = {"one_token": 1, "many_rows": 200, "rows_for_sgemm": 400}.get(case, 33)
    x = torch.randn(1, tokens, 40)
    ids = None
    if case in ("all_on_one_expert", "rows_for_sgemm"):  # every token's both slots on expert 4: 2T rows there
        ids = torch.full((tokens, 2), 4, dtype=torch.long)
    elif case == "ties":  # a zero router: all logits equal, top-k breaks the ties
        with torch.no_grad():
            block.gate.weight.zero_()
    elif case == "idle_experts":  # only experts 0 and 8 get tokens
        ids = torch.tensor([[0, 8]] * tokens)
    got, (weights, ids) = _run(block, x, topk_ids=ids, backend=backend)
    expected, _ = _run(block, x, topk_ids=ids, backend="torch")
    _assert_close(got, expected, torch.float32, f"{backend} {case}")


@pytest.mark.skipif("cpu" not in FAST, reason=f"the cpu backend does not run here: {qwen2_moe_hf.env_report()}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("hidden", [46, 45])
@pytest.mark.parametrize("rows", [5, 8, 9, 16, 17, 40])
def test_cpu_backend_row_regimes(dtype, hidden, rows):
    """The cpu backend's register-blocked kernels (5+ rows per expert): x in blocks of 8 or 16 rows, weights in tiles
    of 4 rows (bf16 read in place, even K only) or 6 (widened), then 2- and 1-row leftovers; hidden 46 / 45 gives
    even and odd K for gate/up, inter 30 and shared 22 leave leftover rows in every tile size."""
    block = _block(hidden=hidden, experts=3, top_k=1, inter=30, shared=22, seed=rows).to(dtype)
    x = torch.randn(1, rows, hidden).to(dtype)
    ids = torch.ones(rows, 1, dtype=torch.long)  # every token on expert 1: `rows` rows there and on the shared one
    got, (weights, ids) = _run(block, x, topk_ids=ids, backend="cpu")
    _assert_close(got, _reference_fp32(block, x, weights, ids), dtype, f"cpu {dtype} hidden={hidden} rows={rows}")


@needs_fast
@pytest.mark.parametrize("backend", FAST)
def test_backend_handles_nan_inputs_without_crashing(backend):
    block = _block()
    x = torch.randn(1, 4, 45)
    x[0, 1, 3] = float("nan")
    flat = x.reshape(-1, 45)
    ids = torch.tensor([[0, 1, 2]] * 4)
    weights = torch.full((4, 3), 1 / 3)
    with torch.no_grad():
        got = moe_forward(flat, ids, weights, block.experts, block.shared_expert, block.shared_expert_gate,
                          backend=backend)
    assert torch.isnan(got[1]).all() and torch.isfinite(got[[0, 2, 3]]).all()


@pytest.mark.skipif("cpu" not in FAST, reason=f"the cpu backend does not run here: {qwen2_moe_hf.env_report()}")
@pytest.mark.parametrize("change", ["new_parameter", "parameter_dict_entry", "new_module", "shared_expert",
                                    "bias_added", "wrapped_module"])
def test_cpu_backend_sees_changed_weights(change):
    """The cpu backend caches where each layer's weights live; every kind of swap must reach the next call (or,
    for what the op cannot run, hand the call to another backend), never leave it on stale weights."""
    block = _block(seed=5)
    x = torch.randn(1, 6, 45)
    flat = x.reshape(-1, 45)
    before, _ = _run(block, x, backend="auto")
    with torch.no_grad():  # as _run calls it: with gradients every call goes to the torch reference
        assert dispatch.select_backend("auto", flat, block.experts, block.shared_expert).name == "cpu"
    expert = block.experts[int(_run(block, x)[1][1][0, 0])]  # an expert that token 0 uses
    fresh = lambda shape: torch.nn.Parameter(torch.randn(shape) * 0.1)  # noqa: E731
    with torch.no_grad():
        if change == "new_parameter":  # module.weight = Parameter(...)
            expert.up_proj.weight = fresh(expert.up_proj.weight.shape)
        elif change == "parameter_dict_entry":  # accelerate's set_module_tensor_to_device writes the dict directly
            expert.up_proj._parameters["weight"] = fresh(expert.up_proj.weight.shape)
        elif change == "new_module":
            linear = torch.nn.Linear(45, expert.up_proj.out_features, bias=False)
            linear.weight.copy_(torch.randn_like(linear.weight) * 0.1)
            expert.up_proj = linear
        elif change == "shared_expert":
            block.shared_expert.down_proj.weight = fresh(block.shared_expert.down_proj.weight.shape)
        elif change == "bias_added":  # the op has no bias: the call must go elsewhere
            expert.up_proj.bias = fresh(expert.up_proj.out_features)
        elif change == "wrapped_module":  # PEFT-style: the projection becomes a wrapper around the old Linear
            expert.up_proj = helpers.Scaled(expert.up_proj)
    after, (weights, ids) = _run(block, x, backend="auto")
    expected, _ = _run(block, x, topk_ids=ids, backend="torch")
    _assert_close(after, expected, torch.float32, change)
    assert (after - before).abs().max() > 1e-4  # the change mattered, so matching the reference means it was seen
    with torch.no_grad():
        runs_on = dispatch.select_backend("auto", flat, block.experts, block.shared_expert).name
    assert runs_on == ("cpu" if change not in ("bias_added", "wrapped_module") else "torch")


def test_registry_rules(monkeypatch, caplog):
    block = _block()
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        dispatch.requested_backend("nope")
    monkeypatch.setenv(dispatch.ENV_BACKEND, "torch")
    assert dispatch.requested_backend(None) == "torch"
    assert dispatch.requested_backend("cpu") == "cpu"  # the model's own setting wins over the environment
    # A named backend that cannot run these inputs says so.
    meta_x = torch.randn(2, 45, dtype=torch.float64)
    block.requires_grad_(False)
    if "cpu" in FAST:
        with pytest.raises(RuntimeError, match="moe_backend 'cpu' cannot run here: dtype torch.float64"):
            dispatch.select_backend("cpu", meta_x, block.experts, block.shared_expert)
    # auto falls back, with one log line per reason.
    caplog.set_level(logging.INFO, logger="qwen2_moe_hf")
    dispatch._warned_fallback.clear()
    for _ in range(3):
        assert dispatch.select_backend("auto", meta_x, block.experts, block.shared_expert).name == "torch"
    report = qwen2_moe_hf.env_report()
    assert len([r for r in caplog.records if "skipped" in r.getMessage()]) == len(report) - 1
    assert report["torch"] == "available" and all(v == "available" or v.startswith("unavailable: ") for v in
                                                   report.values())


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


@pytest.mark.parametrize("backend", ["torch", *FAST])
def test_gradients_equal_the_reference(backend):
    """With autograd on, every backend gives the reference's gradients (fast ones hand such calls to it)."""
    grads = []
    inputs = torch.randn(2, 5, 45)
    for name in ("torch", backend):
        block = _block(seed=5)
        block.config.moe_backend = name
        x = inputs.clone().requires_grad_(True)
        block(x).pow(2).sum().backward()
        grads.append([x.grad] + [p.grad for p in block.parameters()])
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

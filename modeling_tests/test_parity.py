"""Our model against transformers 5.23's built-in qwen2_moe on tiny random checkpoints of several shapes.

On 5.x the built-in runs live beside ours, and the recorded fixtures are checked against it too; on the blog-era
stack (no qwen2_moe in transformers) ours is compared with those fixtures. Either way our side loads the checkpoint
through AutoModelForCausalLM, so registration and loading are part of what is checked.

Every error is per row (helpers.row_error): one wrong token cannot hide behind larger ones.

The fixtures were recorded on one CPU and are compared with results computed on another: the tolerances below hold
across the CPUs this project is tested on, not only the recording machine's. Measured (transformers' own model,
recording vs live, per row): fp32 logits agree within 3e-6 (AVX2-only AMD, AVX-512 BF16 Intel and AMD), bf16 only
within ~2e-2, and bf16 greedy continuations differ, because oneDNN's bf16 kernels round differently on each ISA. So
fp32 is held to FP32_TOL with exact greedy tokens (their top-2 margins, checked below, are 100x the spread), and
bf16 to BF16_TOL, never to its tokens.
"""

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import qwen2_moe_hf
from qwen2_moe_hf import compat
from qwen2_moe_hf.modeling_qwen2_moe import Qwen2MoeForCausalLM

import helpers

FP32_TOL = 1e-4  # per-row relative, on logits: ours vs the built-in, and a recording vs a live run on any CPU
ROUTER_TOL = 1e-5  # relative, on router logits and aux loss, ours vs the built-in on the same CPU
BF16_TOL = 5e-2  # per-row relative, bf16 vs bf16 (ours vs the built-in, or a recording vs a live run)
# Against a recording (the 4.38 stack) instead of the live built-in, ours may be off by what ours may be off from the
# built-in plus what a recording is off from a live run on another CPU (measured up to 2.2e-2: top3_of_8_wide_heads
# on Zen 4, whose bf16 experts' vdpbf16ps kernel put ours at 3.9e-2 from the live built-in, 6.1e-2 from the
# recording; its mean error against fp32 stayed within BF16_ACCURACY of the built-in's, checked below).
BF16_RECORDING_SPREAD = 3e-2
BF16_ACCURACY = 1.25  # ours in bf16 is on average at most this much further from fp32 than the built-in in bf16
BF16_WORST_ROW = 2.0  # ... and in its worst row (one sample: noisier)
MIN_GREEDY_MARGIN = 1e-4  # top-1 minus top-2 logit over the row's largest, at every recorded greedy step


def _reference(name, path, fingerprint, dtype):
    """Outputs of transformers' built-in qwen2_moe for this checkpoint: live on 5.x, recorded on 4.38."""
    suffix = "_bf16" if dtype == torch.bfloat16 else ""
    with safe_open(helpers.fixture_path(name), "pt") as f:
        if f.metadata()["fingerprint"] != str(fingerprint):
            pytest.fail(
                f"{name}: the seeded weights differ from those the fixture was recorded with (torch RNG changed?); "
                "re-record with modeling_tests/fixtures/record_reference.py under transformers 5.23.0"
            )
        recorded = {key: f.get_tensor(key + suffix) for key in ("logits", "router_logits", "aux_loss", "generated")}
    if not compat.HAS_BUILTIN_QWEN2_MOE:
        return recorded
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeForCausalLM as Builtin

    builtin = Builtin.from_pretrained(path, **compat.dtype_kwarg(dtype)).eval()
    assert not isinstance(builtin, Qwen2MoeForCausalLM)
    live = helpers.run_outputs(builtin, helpers.PARITY_CONFIGS[name]["vocab_size"])
    # The fixtures the 4.38 stack relies on must still be what the built-in computes, within what varies by CPU.
    mask = helpers.parity_inputs(2)[1].reshape(-1).bool()
    flat = lambda t: t.flatten(0, 1)  # noqa: E731
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    err = helpers.row_error(flat(recorded["logits"]), flat(live["logits"]), mask)
    router_err = helpers.row_error(recorded["router_logits"], live["router_logits"], mask)
    assert err <= tol and router_err <= tol, (f"{name} {dtype}: the fixture is {err:.1e} (logits) / {router_err:.1e} "
                                              "(router) from the live built-in; re-record it?")
    if dtype == torch.float32:
        assert torch.equal(recorded["generated"], live["generated"])
    return live


@pytest.fixture(scope="module", params=list(helpers.PARITY_CONFIGS))
def checkpoint(request, tmp_path_factory):
    name = request.param
    model = helpers.build_model(name)
    path = helpers.save_checkpoint(model, str(tmp_path_factory.mktemp(name)))
    return name, path, helpers.fingerprint(model)


# Every expert-dispatch backend that can run on this machine is held to the same bounds.
BACKENDS = [name for name, state in qwen2_moe_hf.env_report().items() if state == "available"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def _ours(path, dtype, backend="torch"):
    model = AutoModelForCausalLM.from_pretrained(path, moe_backend=backend, **compat.dtype_kwarg(dtype)).eval()
    assert type(model) is Qwen2MoeForCausalLM and model.config.moe_backend == backend
    assert model.dtype == dtype
    return model


def test_fp32_parity(checkpoint, backend):
    name, path, fp = checkpoint
    expected = _reference(name, path, fp, torch.float32)
    got = helpers.run_outputs(_ours(path, torch.float32, backend), helpers.PARITY_CONFIGS[name]["vocab_size"])
    _, attention_mask, _ = helpers.parity_inputs(2)
    real = attention_mask.reshape(-1).bool()
    rel = helpers.row_error(got["logits"].flatten(0, 1), expected["logits"].flatten(0, 1), real)
    assert rel <= FP32_TOL, f"{name}: logits relative error {rel:.2e}"
    # Router logits of real tokens (those of padding positions depend on how a stack masks empty rows).
    router_rel = helpers.row_error(got["router_logits"], expected["router_logits"], real)
    assert router_rel <= ROUTER_TOL, f"{name}: router logits relative error {router_rel:.2e}"
    assert torch.allclose(got["aux_loss"], expected["aux_loss"], rtol=ROUTER_TOL, atol=0)
    assert torch.equal(got["generated"], expected["generated"]), f"{name}: greedy continuations differ"


def test_bf16_parity(checkpoint, backend):
    name, path, fp = checkpoint
    expected = _reference(name, path, fp, torch.bfloat16)
    exact = _reference(name, path, fp, torch.float32)["logits"].flatten(0, 1)
    got = helpers.run_outputs(_ours(path, torch.bfloat16, backend), helpers.PARITY_CONFIGS[name]["vocab_size"], 1)
    real = helpers.parity_inputs(2)[1].reshape(-1).bool()
    got_logits, expected_logits = got["logits"].flatten(0, 1), expected["logits"].flatten(0, 1)
    rel = helpers.row_error(got_logits, expected_logits, real)
    tol = BF16_TOL if compat.HAS_BUILTIN_QWEN2_MOE else BF16_TOL + BF16_RECORDING_SPREAD
    assert rel <= tol, f"{name}: bf16 logits per-row relative error {rel:.2e}"
    # And ours is as accurate as the built-in's own bf16 run, measured against the fp32 result: on average over the
    # rows (the accuracy), with the worst row as a guard. The worst row alone is one sample of bf16 rounding: which
    # GEMMs take oneDNN moved it 0.8-1.8x the built-in's on one machine, with the mean within 10%.
    ours_err = helpers.row_errors(got_logits, exact, real)
    builtin_err = helpers.row_errors(expected_logits, exact, real)
    assert ours_err.mean() <= BF16_ACCURACY * builtin_err.mean(), \
        f"{name}: mean bf16 error {ours_err.mean():.2e} vs built-in's {builtin_err.mean():.2e}"
    assert ours_err.max() <= BF16_WORST_ROW * builtin_err.max(), \
        f"{name}: worst-row bf16 error {ours_err.max():.2e} vs built-in's {builtin_err.max():.2e}"
    # (Greedy continuations are compared in fp32 only: in bf16 one near-tie, rounded differently by a backend that
    # accumulates in fp32, legitimately sends them apart.)


def _flip_renormalisation(route):
    return lambda logits, k, norm: route(logits, k, not norm)


def _skip_best_expert(route):
    def wrong(logits, k, norm):
        weights, ids = route(logits, k + 1, norm)
        return weights[:, 1:], ids[:, 1:]

    return wrong


@pytest.mark.parametrize("mutation", [_flip_renormalisation, _skip_best_expert])
def test_a_wrong_router_fails_the_tolerance(checkpoint, monkeypatch, mutation):
    """The parity bound is far tighter than what a wrong router does to the logits."""
    name, path, fp = checkpoint
    expected = _reference(name, path, fp, torch.float32)
    from qwen2_moe_hf import modeling_qwen2_moe

    # The torch backend has no fused lane: the block's own route() call (the one the modeling file makes) decides.
    monkeypatch.setattr(modeling_qwen2_moe, "route", mutation(modeling_qwen2_moe.route))
    got = helpers.run_outputs(_ours(path, torch.float32), helpers.PARITY_CONFIGS[name]["vocab_size"], 1)
    real = helpers.parity_inputs(2)[1].reshape(-1).bool()
    rel = helpers.row_error(got["logits"].flatten(0, 1), expected["logits"].flatten(0, 1), real)
    assert rel > 10 * FP32_TOL, f"{name}: a wrong router moved logits by only {rel:.2e}"


def test_routing_is_far_from_uniform(checkpoint):
    """The seeded weights make the router decisive, so parity exercises real routing decisions."""
    name, path, _ = checkpoint
    model = _ours(path, torch.float32)
    input_ids, attention_mask, position_ids = helpers.parity_inputs(model.config.vocab_size)
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, output_router_logits=True)
    probs = torch.softmax(torch.cat(out.router_logits), -1)
    assert probs.max(-1).values.mean() > 3.0 / model.config.num_experts
    assert qwen2_moe_hf.Qwen2MoeConfig is type(model.config)


def test_recorded_greedy_paths_are_far_from_ties(checkpoint):
    """Greedy tokens are compared exactly (in fp32), across CPUs: that is sound only if no step of the recorded
    continuations is a near-tie. Every step's top-2 margin must exceed MIN_GREEDY_MARGIN, over 30x the largest
    fp32 difference seen between CPUs (3e-6 per row). Computed with our model, which agrees with the built-in to
    FP32_TOL, on both stacks."""
    name, path, fp = checkpoint
    model = _ours(path, torch.float32)
    input_ids, attention_mask, _ = helpers.parity_inputs(model.config.vocab_size)
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=32, do_sample=False,
                             pad_token_id=0, eos_token_id=None, output_scores=True, return_dict_in_generate=True)
    margins = []
    for scores in out.scores:
        top = scores.float().topk(2, -1).values
        margins.append(((top[:, 0] - top[:, 1]) / scores.float().abs().amax(-1)).min().item())
    assert min(margins) >= MIN_GREEDY_MARGIN, f"{name}: a greedy step is a near-tie ({min(margins):.1e})"
    assert torch.equal(out.sequences[:, input_ids.shape[1]:], _reference(name, path, fp, torch.float32)["generated"])

"""Shared by the tests: tiny qwen2_moe configs, reproducible random weights that route far from uniform, hub-layout
checkpoints, and the reference outputs recorded from transformers 5.23's built-in qwen2_moe."""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
import zlib

import pytest
import torch

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared")
SHARED = os.path.normpath(SHARED)
TOKENIZER_DIR = os.path.join(SHARED, "qwen-tokenizer")
METADATA_DIR = os.path.join(SHARED, "qwen1.5-moe-metadata")
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")

# The release post's prompt, and the ids transformers 4.38.2 and 5.23.0 give for it (../shared/NOTES.md).
BLOG_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Give me a short introduction to large language model."},
]
BLOG_PROMPT_IDS = [
    151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 35127, 752, 264, 2805,
    16800, 311, 3460, 4128, 1614, 13, 151645, 198, 151644, 77091, 198,
]

_BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=6,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    max_position_embeddings=256,
    pad_token_id=0,
)

# The shapes the parity tests cover (each >= 3 layers).
PARITY_CONFIGS = {
    "gqa": dict(_BASE),
    "sparse_step2_mha_norm": dict(_BASE, num_hidden_layers=4, num_key_value_heads=4, decoder_sparse_step=2,
                                  norm_topk_prob=True),
    "mlp_only_mqa_norm": dict(_BASE, num_key_value_heads=1, mlp_only_layers=[0, 2], norm_topk_prob=True),
    "top3_of_8_wide_heads": dict(_BASE, num_attention_heads=8, num_key_value_heads=2, hidden_size=128,
                                 num_experts=8, num_experts_per_tok=3),
}


def tiny_config_kwargs(name="gqa", **overrides):
    kwargs = dict(PARITY_CONFIGS[name])
    kwargs.update(overrides)
    return kwargs


def randomize_(model, seed):
    """Reproducible random weights, scaled so the router is decisive: router weights std 1 give logits with a
    spread of several units, so top-k picks are far from ties and a wrong router shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("mlp.gate.weight"):
                values = torch.randn(param.shape, generator=gen)
            elif "norm" in name:
                values = 0.5 + torch.rand(param.shape, generator=gen)
            elif "embed_tokens" in name:
                values = torch.randn(param.shape, generator=gen)
            else:
                values = torch.randn(param.shape, generator=gen) * (1.0 / param.shape[-1] ** 0.5)
            param.copy_(values.to(param.dtype))
    return model


def fingerprint(model):
    """A checksum of the weights, to tell whether a rebuilt model is the one a fixture was recorded with."""
    crc = 0
    for name, tensor in sorted(model.state_dict().items()):
        crc = zlib.crc32(tensor.detach().float().contiguous().numpy().tobytes(), zlib.crc32(name.encode(), crc))
    return crc


def build_model(name, seed=0, **overrides):
    """Our model with the named tiny config and seeded weights, fp32, eval mode."""
    from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**tiny_config_kwargs(name, **overrides)))
    return randomize_(model, seed).eval()


def save_checkpoint(model, path, max_shard_size="200KB"):
    """Hub layout: sharded safetensors + model.safetensors.index.json, per-expert keys."""
    model.save_pretrained(path, max_shard_size=max_shard_size, safe_serialization=True)
    return path


def parity_inputs(vocab_size, seed=1):
    """A left-padded batch of two: row 0 has 4 pads, row 1 none; position ids follow the padding, as generate's."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab_size, (2, 12), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0
    input_ids[0, :4] = 0  # pad_token_id
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def fixture_path(name):
    return os.path.join(FIXTURES, f"parity_{name}.safetensors")


def run_outputs(model, vocab_size, max_new_tokens=32):
    """What the parity tests compare: logits, router logits and aux loss of the left-padded batch, and greedy
    continuations of it. Works on our model and on transformers' built-in one."""
    input_ids, attention_mask, position_ids = parity_inputs(vocab_size)
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, output_router_logits=True)
        generated = model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=0, eos_token_id=None,
        )
    return {
        "logits": out.logits.float(),
        "router_logits": torch.stack([r.float() for r in out.router_logits]),
        "aux_loss": out.aux_loss.float().reshape(1),
        "generated": generated[:, input_ids.shape[1]:].contiguous(),
    }


def row_errors(actual, expected, mask=None):
    """Per row (every dimension but the last; those `mask` selects, e.g. real tokens, not padding):
    max |actual - expected| / max |expected| within the row, as a 1-D float tensor. Only rows of exact zeros compare
    absolutely (the scale's floor is float32's smallest normal number)."""
    if mask is not None:
        actual, expected = actual[..., mask, :], expected[..., mask, :]
    a = actual.float().reshape(-1, actual.shape[-1]) if actual.dim() else actual.float().reshape(1, 1)
    e = expected.float().reshape(-1, expected.shape[-1]) if expected.dim() else expected.float().reshape(1, 1)
    if a.shape != e.shape:
        raise AssertionError(f"shapes differ: {list(actual.shape)} vs {list(expected.shape)}")
    if a.numel() == 0:
        return a.new_zeros(0)
    return (a - e).abs().amax(-1) / e.abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny)


def row_error(actual, expected, mask=None):
    """The largest per-row relative error (row_errors). Per row, so that one wrong token cannot hide behind rows of
    larger values, as it can under a global max or a norm."""
    errors = row_errors(actual, expected, mask)
    return errors.max().item() if errors.numel() else 0.0



@contextlib.contextmanager
def int4_torch_oracle():
    """Inside: every GPTQLinear computes by the torch reference (dequantize, then F.linear), not the C++ int4
    kernels, so that a reference built from GPTQ modules does not run the code under test."""
    from qwen2_moe_hf.gptq.linear import ENV_KERNEL

    previous = os.environ.get(ENV_KERNEL)
    os.environ[ENV_KERNEL] = "torch"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[ENV_KERNEL]
        else:
            os.environ[ENV_KERNEL] = previous


def routed(block, x, backend, topk_ids=None):
    """(the block's routed experts on `backend`, (weights, ids)): routed by the block's own router, or to
    `topk_ids` with its weights; no shared expert. Without autograd."""
    from qwen2_moe_hf.moe import route

    flat = x.reshape(-1, x.shape[-1])
    previous = block.config.moe_backend
    block.config.moe_backend = backend
    try:
        with torch.no_grad():
            weights, ids = route(block.gate(flat), block.top_k, block.norm_topk_prob)
            if topk_ids is not None:
                ids = topk_ids
            return block.experts(flat, ids, weights), (weights, ids)
    finally:
        block.config.moe_backend = previous


def block_reference(block, x, logits, dtype=torch.float32):
    """The whole block as the torch reference computes it in `dtype` on the block's (rounded) weights, routed from
    the given router logits, with every GPTQ layer on the torch path: [tokens, hidden]."""
    import copy

    from qwen2_moe_hf.moe import experts_forward_reference, route

    ref = copy.deepcopy(block).to(dtype)
    weights, ids = route(logits, block.top_k, block.norm_topk_prob)
    flat = x.reshape(-1, x.shape[-1]).to(dtype)
    with torch.no_grad(), int4_torch_oracle():
        out = experts_forward_reference(flat, ids, weights.to(dtype), ref.experts)
        return out + torch.sigmoid(ref.shared_expert_gate(flat)) * ref.shared_expert(flat)


def resolved_backend(block, x):
    """The name of the backend the block's experts resolve to for x (without autograd)."""
    from qwen2_moe_hf.moe import requested_backend, resolve

    weights = block.experts.prepared_weights(block.shared_expert)
    return resolve(requested_backend(block.config.moe_backend), weights, x.device, x.dtype).name


class Scaled(torch.nn.Module):
    """A PEFT-style wrapper: holds the original layer as a submodule and changes its output (x3), so a backend
    that kept computing with the wrapped layer's own weights would show it."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, h):
        return 3 * self.base(h)


@contextlib.contextmanager
def running_server(model, log_path, env=None, cwd=None, extra_args=()):
    """`qwen2-moe-hf serve --model MODEL` on a free loopback port, started and waited for (its /health answers);
    yields its base URL and stops it after. A server that dies or does not come up in 4 minutes fails the test
    with the end of its log."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "qwen2_moe_hf.cli", "serve", "--model", model, "--host", "127.0.0.1",
            "--port", str(port), "--device", "cpu", *extra_args]
    with open(log_path, "w") as out:
        proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                with open(log_path) as f:
                    pytest.fail(f"the server did not start (exit {proc.poll()}):\n{f.read()[-4000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


# The device each built-in backend runs on (any other registered backend: the CPU).
GPU_BACKENDS = ("triton",)


def backend_device(name):
    """The device a backend takes its inputs on: cuda for the GPU backends, else the CPU."""
    return torch.device("cuda") if name in GPU_BACKENDS else torch.device("cpu")


def backend_skip_reason(name):
    """None when the backend runs here, else why not, as "<name>: <why>" (env_report()'s reason)."""
    from qwen2_moe_hf.moe.backends import registry

    ok, why = registry.backend(name).available()
    return None if ok else f"{name}: {why}"


def backend_params(exclude=("torch",), skip=None):
    """Every registered backend (the registry's full list, not only those that run here) but `exclude`, as
    pytest params that skip with the backend's own reason where it cannot run. `skip`: {name: reason} for backends
    the test does not apply to."""
    from qwen2_moe_hf.moe.backends import registry

    params = []
    for name in registry.available_backends():
        if name in exclude:
            continue
        why = (skip or {}).get(name) or backend_skip_reason(name)
        params.append(pytest.param(name, id=name, marks=pytest.mark.skipif(why is not None, reason=why or "")))
    return params


def on_device(device, *objects):
    """Each tensor or module moved to `device` (None stays None): a module in place, as nn.Module.to does."""
    return tuple(None if o is None else o.to(device) for o in objects)


@contextlib.contextmanager
def own_cpu_kernels():
    """The CPU ops on our own fp32-sum kernels only, whatever the CPU: no oneDNN bf16 matmul (native_bf16.h), no
    bf16-rounded activations for the vdpbf16ps kernel (bf16_dot.h) and no int8 activations for the int4 GEMM
    (int4_vnni.h). Those paths round intermediate values (as the torch path does);
    tests of the ops' one-rounding contract run without them, and the paths have tests of their own."""
    from qwen2_moe_hf.kernels.build import cpu_module, load_cpu_ops

    if not load_cpu_ops()[0]:
        yield
        return
    module = cpu_module()
    module.set_native_bf16_rows(0)
    module.set_native_int4_rows(0)
    module.set_int4_vnni(False)
    module.set_bf16_dot(False)
    try:
        yield
    finally:
        module.set_native_bf16_rows(-1)
        module.set_native_int4_rows(-1)
        module.set_int4_vnni(True)
        module.set_bf16_dot(True)

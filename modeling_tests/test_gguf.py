"""qwen2_moe_hf/to_gguf.py: a tiny random qwen2_moe checkpoint converted to GGUF gives, in llama.cpp
(llama-cpp-python), the logits our model gives for the same token ids. This is what makes `qwen2-moe-hf bench
--vs-llamacpp` compare the same model in both. Needs `gguf` and `llama-cpp-python`, which the CI stacks do not
install: skipped there."""

import numpy as np
import pytest
import torch

import helpers

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf); only the llama.cpp "
                                          "comparison benchmark needs it")
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install "
                                                    "llama-cpp-python); only the llama.cpp comparison benchmark needs it")

from qwen2_moe_hf import to_gguf  # noqa: E402

# Tiny but with every feature llama.cpp's qwen2moe graph must get right: GQA (4 heads, 2 KV heads), q/k/v biases,
# rope_theta 1e6, a shared expert with its sigmoid gate, top-2 of 8 without renormalisation, untied lm_head.
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, max_position_embeddings=256, rope_theta=1e6, rms_norm_eps=1e-6,
            norm_topk_prob=False, tie_word_embeddings=False, pad_token_id=0)
TOKENS = [5, 77, 300, 1, 511, 42, 42, 128, 9, 260]
# Tolerances, relative to the largest |logit| (which is O(1) here): f32 GGUF with an f32 KV cache differs from torch's
# fp32 only in summation order; f16 GGUF rounds the weights (2^-11 relative) and ggml also rounds the activations
# to f16 inside its f16 matmuls, and the KV cache is f16.
TOL = {"f32": 1e-5, "f16": 5e-3}  # measured here: 7.9e-7; 6.7e-4 and 9.0e-4 (native and non-AMX builds)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    import qwen2_moe_hf  # noqa: F401  (ours in charge of model_type qwen2_moe)
    from qwen2_moe_hf import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    model = helpers.randomize_(Qwen2MoeForCausalLM(Qwen2MoeConfig(**TINY)), seed=0).eval()
    with torch.no_grad():
        # Biases are zero-initialised; give them values so that a dropped bias shows in the logits.
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("tiny_qwen2_moe")
    helpers.save_checkpoint(model, str(path))
    loaded = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    assert type(loaded).__module__.startswith("qwen2_moe_hf"), type(loaded)
    with torch.no_grad():
        want = loaded(torch.tensor([TOKENS])).logits[0].float().numpy()
    return str(path), want


def _llama_logits(path: str, extra_bufts: bool = True) -> np.ndarray:
    if not extra_bufts:
        # llama_model_params.use_extra_bufts = false (no AMX / CPU_REPACK weight buffers); Llama() reads the
        # defaults from llama_cpp.llama_cpp when it is built, and does not expose the field itself.
        import llama_cpp.llama_cpp as lc

        defaults = lc.llama_model_default_params

        def no_extra_bufts():
            params = defaults()
            params.use_extra_bufts = False
            return params

        lc.llama_model_default_params = no_extra_bufts
    try:
        return _llama_logits_with_defaults(path)
    finally:
        if not extra_bufts:
            lc.llama_model_default_params = defaults


def _llama_logits_with_defaults(path: str) -> np.ndarray:
    # f32 KV cache: the f32 comparison then measures the conversion and the graph, not the cache's rounding.
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_batch=64, n_threads=2, n_threads_batch=2, logits_all=True,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    try:
        assert llm.n_vocab() == TINY["vocab_size"]
        llm.eval(TOKENS)
        return np.array(llm.scores[: len(TOKENS)], dtype=np.float32)
    finally:
        llm.close()


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_llama_cpp_logits_equal_ours(tiny, tmp_path, outtype):
    src, want = tiny
    out = to_gguf.convert(src, str(tmp_path / f"tiny-{outtype}.gguf"), outtype=outtype)
    got = _llama_logits(out)
    scale = np.abs(want).max()
    err = np.abs(got - want).max() / scale
    print(f"{outtype}: max |llama.cpp - ours| = {np.abs(got - want).max():.3e} (max |logit| {scale:.3f}, "
          f"relative {err:.2e})")
    assert err < TOL[outtype], f"{outtype}: relative max-abs difference {err:.2e} >= {TOL[outtype]}"
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_llama_cpp_quantizer_keeps_embd_and_output_f16(tiny, tmp_path):
    src, want = tiny
    f16 = to_gguf.convert(src, str(tmp_path / "tiny-f16.gguf"))
    q4 = to_gguf.quantize(f16, str(tmp_path / "tiny-q4_0.gguf"), "Q4_0", keep_embd_output_f16=True)
    types = to_gguf.tensor_types(q4)
    assert types["token_embd.weight"] == "F16" and types["output.weight"] == "F16", types
    assert types["blk.0.ffn_gate_exps.weight"] == "Q4_0", types
    assert types["blk.0.ffn_gate_inp.weight"] == "F32", types  # the router is never quantized
    # Without AMX / CPU_REPACK buffers: on an AMX Xeon, llama-cpp-python 0.3.36's ggml_backend_amx_mul_mat
    # segfaults on this tiny model's Q4_0 / Q8_0 weights (seen at hidden 64 and 256). This checks our conversion
    # and the quantizer's output, not ggml's AMX kernels.
    got = _llama_logits(q4, extra_bufts=False)
    # 4-bit weights: only a sanity bound (the random model is not robust to quantization noise).
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 0.5, rel


def test_errors_name_the_file_and_field(tmp_path):
    import json

    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "qwen2_moe", **TINY, "norm_topk_prob": True}))
    with pytest.raises(to_gguf.GGUFConversionError, match=r"config\.json.*norm_topk_prob"):
        to_gguf.convert(str(src), str(tmp_path / "x.gguf"))
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(to_gguf.GGUFConversionError, match=r"config\.json.*model_type"):
        to_gguf.convert(str(src), str(tmp_path / "x.gguf"))

"""Hub-layout qwen2_moe checkpoint -> GGUF (llama.cpp arch `qwen2moe`), and llama.cpp's own quantizer on the result.

    python benchmarks/to_gguf.py SRC_DIR OUT.gguf [--outtype f16|f32]      (or python -m qwen2_moe_hf.to_gguf)
    python benchmarks/to_gguf.py --quantize IN.gguf OUT.gguf --type Q4_0|Q4_K_M [--llama-default-embd-output]

Written for `qwen2-moe-hf bench --vs-llamacpp` (bench_llamacpp.py) and modeling_tests/test_gguf.py: same weights in
our model and in
llama.cpp. It is a deliberately small converter (not llama.cpp's convert_hf_to_gguf.py): full-precision safetensors
(sharded with model.safetensors.index.json, or one model.safetensors), per-expert keys as on the hub, every layer a
MoE layer with a shared expert. The vocabulary is written as llama.cpp's "no_vocab" tokenizer with
`qwen2moe.vocab_size`: llama.cpp then needs no token texts, which is all a timing or a logits check on token ids
needs (the real Qwen tokenizer is not involved; prompts are token ids).

Needs `gguf` (the converter) and `llama-cpp-python` (only for quantize()).
"""

import argparse
import ctypes
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors import safe_open

ARCH = "qwen2moe"  # llama.cpp's name for Qwen1.5-MoE / Qwen2-MoE
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# llama.cpp's ftype ids (llama.h: LLAMA_FTYPE_*), and ggml's type ids for the tensors kept at f16.
QUANT_FTYPES = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
                "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


class GGUFConversionError(ValueError):
    """The checkpoint cannot be converted; the message names the file and field or tensor at fault."""


# ---------------------------------------------------------------------------------------------------------------
# Reading the checkpoint


def read_config(src: str) -> Dict[str, Any]:
    path = os.path.join(src, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise GGUFConversionError(f"{path}: not found (expected a hub-layout checkpoint folder)") from None
    except json.JSONDecodeError as exc:
        raise GGUFConversionError(f"{path}: not valid JSON ({exc})") from None
    if config.get("model_type") != "qwen2_moe":
        raise GGUFConversionError(f"{path}: model_type is {config.get('model_type')!r}, expected 'qwen2_moe'")
    if config.get("quantization_config"):
        raise GGUFConversionError(f"{path}: has a quantization_config; convert a full-precision checkpoint "
                                  "(quantize the GGUF with quantize() instead)")
    return config


def _field(config: Dict[str, Any], name: str, src: str) -> Any:
    if name not in config:
        raise GGUFConversionError(f"{os.path.join(src, 'config.json')}: field {name!r} is missing")
    return config[name]


def rope_theta(config: Dict[str, Any]) -> float:
    """Hub configs (4.39 form) have `rope_theta`; configs saved by transformers 5.x have `rope_parameters`."""
    params = config.get("rope_parameters") or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    return float(config.get("rope_theta", 10000.0))


def check_supported(config: Dict[str, Any], src: str) -> None:
    """What this converter (and llama.cpp's qwen2moe graph) cannot express, said up front."""
    where = os.path.join(src, "config.json")
    layers = _field(config, "num_hidden_layers", src)
    if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
        raise GGUFConversionError(f"{where}: mlp_only_layers / decoder_sparse_step != 1 (dense layers) are not "
                                  "supported: llama.cpp's qwen2moe makes every layer a MoE layer")
    if config.get("norm_topk_prob", False):
        # llama.cpp's qwen2moe graph never renormalises the top-k weights (Qwen1.5-MoE's norm_topk_prob is false).
        raise GGUFConversionError(f"{where}: norm_topk_prob true is not supported by llama.cpp's qwen2moe graph")
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in (None, "default"):
        raise GGUFConversionError(f"{where}: rope type {kind!r} is not supported (only the default RoPE)")
    if layers < 1:
        raise GGUFConversionError(f"{where}: num_hidden_layers must be >= 1, got {layers}")


class Checkpoint:
    """The tensors of a safetensors checkpoint folder, read one at a time (a 4-layer real-shape model is ~6 GB)."""

    def __init__(self, src: str) -> None:
        self.src = src
        index = os.path.join(src, INDEX_FILE)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise GGUFConversionError(f"{index}: no usable weight_map ({exc})") from None
        elif os.path.exists(os.path.join(src, SINGLE_FILE)):
            weight_map = None
        else:
            raise GGUFConversionError(f"{src}: neither {INDEX_FILE} nor {SINGLE_FILE} (only safetensors are read)")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        self._handles = {}
        self.where: Dict[str, str] = {}
        for name in files:
            path = os.path.join(src, name)
            try:
                handle = safe_open(path, framework="pt")
            except Exception as exc:  # safetensors raises its own error types for truncated / corrupt files
                raise GGUFConversionError(f"{path}: cannot be read as safetensors ({exc})") from None
            self._handles[name] = handle
            for key in handle.keys():
                self.where[key] = name

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise GGUFConversionError(f"{self.src}: tensor {key!r} is missing")
        return self._handles[self.where[key]].get_tensor(key)

    def shape(self, key: str) -> Tuple[int, ...]:
        if key not in self.where:
            raise GGUFConversionError(f"{self.src}: tensor {key!r} is missing")
        return tuple(self._handles[self.where[key]].get_slice(key).get_shape())


# ---------------------------------------------------------------------------------------------------------------
# The tensor plan: GGUF name -> how to build it from the checkpoint


def _prefix(ckpt: Checkpoint) -> str:
    # Hub checkpoints of the CausalLM have "model."; a bare Qwen2MoeModel's save does not.
    return "model." if "model.embed_tokens.weight" in ckpt else ""


def tensor_plan(config: Dict[str, Any], ckpt: Checkpoint) -> List[Tuple[str, List[str], str, Tuple[int, ...]]]:
    """[(gguf name, checkpoint keys, kind, numpy shape)]; kind: 'matrix' (f16 or f32 by outtype), 'f32' (norms,
    biases, router: kept f32 as llama.cpp's own converter does), 'stack' (experts, stacked to [E, out, in]),
    'vector' (shared_expert_gate [1, H] -> [H])."""
    p = _prefix(ckpt)
    hidden = config["hidden_size"]
    experts = config["num_experts"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["moe_intermediate_size"]
    shared = config["shared_expert_intermediate_size"]
    vocab = config["vocab_size"]
    lm_head = "lm_head.weight"
    if lm_head not in ckpt:
        if not config.get("tie_word_embeddings", False):
            raise GGUFConversionError(f"{ckpt.src}: tensor 'lm_head.weight' is missing and tie_word_embeddings is "
                                      "false")
        lm_head = f"{p}embed_tokens.weight"
    plan = [("token_embd.weight", [f"{p}embed_tokens.weight"], "matrix", (vocab, hidden)),
            ("output_norm.weight", [f"{p}norm.weight"], "f32", (hidden,)),
            ("output.weight", [lm_head], "matrix", (vocab, hidden))]
    for i in range(config["num_hidden_layers"]):
        L, B = f"{p}layers.{i}.", f"blk.{i}."
        att = L + "self_attn."
        plan += [
            (B + "attn_norm.weight", [L + "input_layernorm.weight"], "f32", (hidden,)),
            (B + "attn_q.weight", [att + "q_proj.weight"], "matrix", (heads * head_dim, hidden)),
            (B + "attn_q.bias", [att + "q_proj.bias"], "f32", (heads * head_dim,)),
            (B + "attn_k.weight", [att + "k_proj.weight"], "matrix", (kv_heads * head_dim, hidden)),
            (B + "attn_k.bias", [att + "k_proj.bias"], "f32", (kv_heads * head_dim,)),
            (B + "attn_v.weight", [att + "v_proj.weight"], "matrix", (kv_heads * head_dim, hidden)),
            (B + "attn_v.bias", [att + "v_proj.bias"], "f32", (kv_heads * head_dim,)),
            (B + "attn_output.weight", [att + "o_proj.weight"], "matrix", (hidden, heads * head_dim)),
            (B + "ffn_norm.weight", [L + "post_attention_layernorm.weight"], "f32", (hidden,)),
            # The router stays f32 (llama.cpp's quantizer leaves ffn_gate_inp alone too): routing is a top-k pick.
            (B + "ffn_gate_inp.weight", [L + "mlp.gate.weight"], "f32", (experts, hidden)),
        ]
        for proj, gguf, shape in (("gate_proj", "ffn_gate_exps", (experts, inter, hidden)),
                                  ("up_proj", "ffn_up_exps", (experts, inter, hidden)),
                                  ("down_proj", "ffn_down_exps", (experts, hidden, inter))):
            keys = [f"{L}mlp.experts.{e}.{proj}.weight" for e in range(experts)]
            plan.append((B + gguf + ".weight", keys, "stack", shape))
        plan += [
            (B + "ffn_gate_shexp.weight", [L + "mlp.shared_expert.gate_proj.weight"], "matrix", (shared, hidden)),
            (B + "ffn_up_shexp.weight", [L + "mlp.shared_expert.up_proj.weight"], "matrix", (shared, hidden)),
            (B + "ffn_down_shexp.weight", [L + "mlp.shared_expert.down_proj.weight"], "matrix", (hidden, shared)),
            (B + "ffn_gate_inp_shexp.weight", [L + "mlp.shared_expert_gate.weight"], "vector", (hidden,)),
        ]
    return plan


def _check_shapes(plan: Sequence[Tuple[str, List[str], str, Tuple[int, ...]]], ckpt: Checkpoint) -> None:
    """Every source tensor present with the shape the config implies, before a byte is written."""
    for name, keys, kind, shape in plan:
        want = shape[1:] if kind == "stack" else ((1,) + shape if kind == "vector" else shape)
        for key in keys:
            got = ckpt.shape(key)
            if got != tuple(want):
                raise GGUFConversionError(f"{ckpt.src}: tensor {key!r} has shape {list(got)}, expected "
                                          f"{list(want)} from config.json (for GGUF {name})")


def _load(kind: str, keys: List[str], ckpt: Checkpoint, matrix_dtype: np.dtype) -> np.ndarray:
    if kind == "stack":
        # One expert at a time into the preallocated stack: never two copies of a 346 MB tensor in flight.
        first = ckpt.get(keys[0])
        out = np.empty((len(keys),) + tuple(first.shape), dtype=matrix_dtype)
        for e, key in enumerate(keys):
            out[e] = (first if e == 0 else ckpt.get(key)).float().numpy()
        return out
    t = ckpt.get(keys[0]).float()
    if kind == "vector":
        t = t.reshape(-1)
    return t.numpy().astype(np.float32 if kind in ("f32", "vector") else matrix_dtype, copy=False)


def convert(src: str, dst: str, outtype: str = "f16", progress: bool = False) -> str:
    """Write `dst` (GGUF, arch qwen2moe) from the full-precision hub-layout checkpoint folder `src`. Matrices are
    stored in `outtype` (f16 or f32); norms, biases, the router and the shared-expert gate in f32. Tensors are
    streamed to the file one at a time. Returns dst."""
    import gguf

    if outtype not in ("f16", "f32"):
        raise GGUFConversionError(f"outtype: expected 'f16' or 'f32', got {outtype!r}")
    config = read_config(src)
    check_supported(config, src)
    ckpt = Checkpoint(src)
    plan = tensor_plan(config, ckpt)
    _check_shapes(plan, ckpt)
    matrix_dtype = np.dtype(np.float16 if outtype == "f16" else np.float32)

    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    writer = gguf.GGUFWriter(dst, ARCH)
    writer.add_name(os.path.basename(os.path.normpath(src)) or "qwen2_moe")
    # The keys llama.cpp's loader reads for qwen2moe (llama-model.cpp: required ones first).
    writer.add_context_length(int(config.get("max_position_embeddings", 32768)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(int(config.get("intermediate_size", config["shared_expert_intermediate_size"])))
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads", heads))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)  # the graph asserts n_rot == head_dim
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_expert_count(config["num_experts"])
    writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32)
    # No token texts: llama.cpp's "no_vocab" tokenizer with the vocabulary size alone (llama-vocab.cpp reads
    # `<arch>.vocab_size` for it). Enough for token-id prompts; llama.cpp cannot tokenize text with it.
    writer.add_tokenizer_model("no_vocab")
    writer.add_vocab_size(config["vocab_size"])

    # Two passes: tensor infos (shapes only) into the header, then the data streamed in the same order.
    for name, keys, kind, shape in plan:
        dtype = np.dtype(np.float32) if kind in ("f32", "vector") else matrix_dtype
        writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for n, (name, keys, kind, shape) in enumerate(plan):
        array = _load(kind, keys, ckpt, matrix_dtype)
        if array.shape != shape:  # _check_shapes checked the sources; this guards the stacking itself
            raise GGUFConversionError(f"{src}: GGUF {name}: built shape {list(array.shape)}, expected {list(shape)}")
        writer.write_tensor_data(np.ascontiguousarray(array))
        del array
        if progress:
            print(f"\r[{n + 1}/{len(plan)}] {name:40s}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    writer.close()
    return dst


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp's quantizer


def quantize(src: str, dst: str, kind: str = "Q4_0", keep_embd_output_f16: bool = True, nthread: int = 2) -> str:
    """Quantize the GGUF `src` into `dst` with llama.cpp's own quantizer (llama_model_quantize). kind: Q4_0 |
    Q4_K_M | Q8_0. With `keep_embd_output_f16`, token_embd and output stay f16 (as our GPTQ-Int4 keeps the
    embeddings and lm_head in 16 bits); without it, llama.cpp picks its defaults for them (Q4_0: q4_0 embeddings and
    q6_K output; Q4_K_M: q4_K / q6_K). Returns dst."""
    import llama_cpp

    if kind not in QUANT_FTYPES:
        raise GGUFConversionError(f"kind: expected one of {', '.join(QUANT_FTYPES)}, got {kind!r}")
    if not os.path.exists(src):
        raise GGUFConversionError(f"{src}: not found")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_FTYPES[kind])
    params.nthread = nthread
    if keep_embd_output_f16:
        params.token_embedding_type = llama_cpp.GGML_TYPE_F16
        params.output_tensor_type = llama_cpp.GGML_TYPE_F16
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise GGUFConversionError(f"llama_model_quantize({src} -> {dst}, {kind}) failed with code {rc} (llama.cpp's "
                                  "log above says why)")
    return dst


def tensor_types(path: str) -> Dict[str, str]:
    """{tensor name: ggml type name} of a GGUF file (to report what llama.cpp's quantizer chose)."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: t.tensor_type.name for t in reader.tensors}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="checkpoint folder (convert) or GGUF file (--quantize)")
    parser.add_argument("dst", help="GGUF file to write")
    parser.add_argument("--outtype", default="f16", choices=["f16", "f32"], help="matrix dtype when converting")
    parser.add_argument("--quantize", action="store_true", help="quantize the GGUF SRC with llama.cpp instead")
    parser.add_argument("--type", default="Q4_0", choices=sorted(QUANT_FTYPES), help="with --quantize")
    parser.add_argument("--llama-default-embd-output", action="store_true",
                        help="with --quantize: llama.cpp's default types for token_embd/output (default: keep f16)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        if args.quantize:
            quantize(args.src, args.dst, args.type, not args.llama_default_embd_output, args.threads)
        else:
            convert(args.src, args.dst, args.outtype, progress=True)
    except GGUFConversionError as exc:
        parser.exit(2, f"to_gguf: error: {exc}\n")
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Several devices (docs/devices.md): tensor parallelism with `tp_plan="auto"` (transformers 5.x; torchrun on CPU with
gloo) against one process; accelerate's device_map with CPU and disk offload against the model all in memory, for
full-precision checkpoints (both loaders) and GPTQ ones (disk refused by name); tensor parallelism refused by name
where it cannot run; and torch.compile of the decode step against eager greedy decoding."""

import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import qwen2_moe_hf  # noqa: F401  (registers the classes)
from qwen2_moe_hf import Qwen2MoeForCausalLM, compat
from qwen2_moe_hf.gptq.quantize import quantize_checkpoint
from qwen2_moe_hf.kernels.build import load_cpu_ops

import helpers

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# The tensor-parallel model: GQA (4 query heads, 2 KV heads: both divide by the 2 ranks, as every sharded width of
# this config does) with a dense layer between two MoE layers, so the attention, expert, shared-expert and dense
# MLP rules all apply.
TP_CONFIG = dict(name="gqa", mlp_only_layers=[1])
TP_RANKS = 2
TP_NEW_TOKENS = 8
# The largest per-row relative error of the logits against one process in the same dtype: one all-reduce of two
# halves per o_proj / down_proj changes only the order of summation, whose rounding in bfloat16 (a few of its ulps,
# 2^-8 each, through 3 layers) is also checked against float32 below.
TP_TOL = {"float32": 1e-5, "bfloat16": 5e-2}
needs_v5 = pytest.mark.skipif(not compat.IS_V5, reason=f"transformers {compat.TRANSFORMERS_VERSION} has no tensor "
                              "parallelism (from_pretrained's tp_plan is 5.x's; test_tp_plan_needs_transformers_5 "
                              "checks the error here)")


def _logits_and_tokens(model, new_tokens=TP_NEW_TOKENS, margins=False):
    """(logits of the parity batch, its greedy new tokens, the mask of its real tokens[, each step's gap between the
    two largest logits and the largest logit's magnitude: [batch, new_tokens] each])."""
    ids, mask, positions = helpers.parity_inputs(model.config.vocab_size)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=positions).logits.float()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, eos_token_id=None, output_scores=margins,
                             return_dict_in_generate=True)
    result = (logits, out.sequences[:, ids.shape[1]:], mask.bool())
    if not margins:
        return result
    scores = torch.stack([s.float() for s in out.scores], dim=1)  # [batch, steps, vocab]
    top = scores.topk(2, dim=-1).values
    return result + (top[..., 0] - top[..., 1], scores.abs().amax(-1))


def _same_until_a_near_tie(got, expected, gap, scale, relative):
    """Greedy tokens compared step by step until the reference's two best logits are within `relative` of its
    largest one (a near tie: rounding may pick either, and the sequences part there). Returns the steps compared."""
    compared = 0
    for row in range(expected.shape[0]):
        for step in range(expected.shape[1]):
            if gap[row, step] <= relative * scale[row, step]:
                break
            assert got[row, step] == expected[row, step], f"row {row} step {step}: {got[row]} vs {expected[row]}"
            compared += 1
    return compared


# ------------------------------------------------------------------------------------------- tensor parallelism


def _wildcard(name):
    return re.sub(r"\.\d+(\.|$)", lambda m: ".*" + m.group(1), name)


@pytest.mark.parametrize("overrides", [{}, {"mlp_only_layers": [1]}, {"num_experts": 0}],
                         ids=["all_moe", "with_dense_layer", "all_dense"])
def test_tp_plan_names_our_modules(overrides):
    """base_model_tp_plan names modules of the model built from the config (transformers warns about a rule that
    matches nothing), shards every Linear but the router and the shared expert's gate, and is never saved."""
    model = helpers.build_model("gqa", **overrides)
    plan = model.config.base_model_tp_plan
    base = {_wildcard(name) for name, _ in model.model.named_modules()}
    assert set(plan) <= base, sorted(set(plan) - base)
    linears = {_wildcard(name) for name, m in model.model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears - set(plan) == ({"layers.*.mlp.gate", "layers.*.mlp.shared_expert_gate"}
                                   if model.config.num_experts else set())
    for rule, style in plan.items():  # gate/up/q/k/v split their outputs, down/o their inputs (then all-reduce)
        assert style == ("rowwise" if rule.endswith(("down_proj", "o_proj")) else "colwise"), rule
    assert Qwen2MoeForCausalLM._tp_plan == {"lm_head": "colwise_gather_output"}
    assert not {k for k in model.config.to_dict() if "plan" in k.lower()}


def test_sharded_expert_weights_never_reach_the_kernels():
    """A weight that is a tensor subclass (tensor parallelism's DTensor shards) leaves the layer to the torch
    reference, which calls the experts' modules (and the hooks that gather their shards); naming a kernel backend
    then raises instead of computing partial sums."""
    from qwen2_moe_hf.moe import prepare, resolve

    class Shard(torch.Tensor):  # stands in for a DTensor: a subclass whose storage is not the whole weight
        pass

    block = helpers.build_model("gqa").model.layers[0].mlp
    expert = block.experts[3].down_proj
    expert.weight = torch.nn.Parameter(expert.weight.detach().as_subclass(Shard))
    weights = prepare(block.experts, block.shared_expert)
    assert weights.kind is None and "tensor subclasses (Shard" in weights.reason
    x = torch.randn(5, 64)
    assert helpers.resolved_backend(block, x) == "torch"
    if not load_cpu_ops()[0]:
        pytest.skip("the CPU ops are not built: no kernel backend to refuse")
    with pytest.raises(RuntimeError, match="moe_backend 'cpu' cannot run here: expert weights are tensor subclasses"):
        resolve("cpu", weights, x.device, x.dtype)


@pytest.fixture(scope="module")
def tp_checkpoint(tmp_path_factory):
    config = helpers.tiny_config_kwargs(TP_CONFIG["name"], mlp_only_layers=TP_CONFIG["mlp_only_layers"])
    assert config["num_attention_heads"] % TP_RANKS == 0 and config["num_key_value_heads"] % TP_RANKS == 0
    model = helpers.build_model(TP_CONFIG["name"], seed=5, mlp_only_layers=TP_CONFIG["mlp_only_layers"])
    return helpers.save_checkpoint(model, str(tmp_path_factory.mktemp("tp")))


@pytest.fixture(scope="module")
def tp_results(tp_checkpoint, tmp_path_factory):
    """{dtype name: [rank 0's result, rank 1's]} from tp_worker.py under torchrun (both dtypes in one launch)."""
    out = str(tmp_path_factory.mktemp("tp_out"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={TP_RANKS}",
               os.path.join(HERE, "tp_worker.py"), tp_checkpoint, out, ",".join(TP_TOL), str(TP_NEW_TOKENS)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    return {name: [torch.load(os.path.join(out, f"{name}_rank{r}.pt")) for r in range(TP_RANKS)] for name in TP_TOL}


@needs_v5
@pytest.mark.parametrize("dtype_name", list(TP_TOL))
def test_tensor_parallel_equals_one_process(tp_checkpoint, tp_results, dtype_name):
    ranks = tp_results[dtype_name]
    dtype = getattr(torch, dtype_name)
    reference = AutoModelForCausalLM.from_pretrained(tp_checkpoint, **compat.dtype_kwarg(dtype))
    logits, tokens, real, gap, scale = _logits_and_tokens(reference, margins=True)
    exact = _logits_and_tokens(AutoModelForCausalLM.from_pretrained(tp_checkpoint))[0][real]  # float32
    for rank, result in enumerate(ranks):
        assert result["world_size"] == TP_RANKS
        err = helpers.row_error(result["logits"][real], logits[real])
        assert err < TP_TOL[dtype_name], f"rank {rank}: logits {err:.2e} from one process"
        if dtype == torch.float32:
            assert torch.equal(result["generated"], tokens), f"rank {rank}: {result['generated']} vs {tokens}"
        else:  # this tiny model's bfloat16 logits tie exactly now and then (8 bits of mantissa): up to a near tie
            assert _same_until_a_near_tie(result["generated"], tokens, gap, scale, 2**-6) >= 4
    if dtype != torch.float32:  # no further from float32's logits than one process in this dtype is
        one, tp = helpers.row_error(logits[real], exact), helpers.row_error(ranks[0]["logits"][real], exact)
        assert tp <= 1.5 * one + 1e-3, f"tensor parallel {tp:.2e} from float32, one process {one:.2e}"
    assert torch.equal(ranks[0]["logits"], ranks[1]["logits"])  # all-reduced: the same on every rank
    # It really was sharded, as the plan says, and the MoE layers ran the reference through the modules.
    sharded = ranks[0]["sharded"]
    halves = {
        "model.embed_tokens.weight": [64, 64], "lm_head.weight": [64, 64],
        "model.layers.0.self_attn.q_proj.weight": [32, 64], "model.layers.0.self_attn.q_proj.bias": [32],
        "model.layers.2.self_attn.k_proj.weight": [16, 64], "model.layers.0.self_attn.o_proj.weight": [64, 32],
        "model.layers.0.mlp.experts.5.gate_proj.weight": [16, 64], "model.layers.2.mlp.experts.0.up_proj.weight":
            [16, 64], "model.layers.0.mlp.experts.2.down_proj.weight": [64, 16],
        "model.layers.0.mlp.shared_expert.up_proj.weight": [24, 64],
        "model.layers.2.mlp.shared_expert.down_proj.weight": [64, 24],
        "model.layers.1.mlp.gate_proj.weight": [48, 64], "model.layers.1.mlp.down_proj.weight": [64, 48],
    }
    assert {k: sharded.get(k) for k in halves} == halves
    for replicated in ("model.layers.0.mlp.gate.weight", "model.layers.0.mlp.shared_expert_gate.weight",
                       "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert replicated not in sharded
    assert ranks[0]["backends"] == {"model.layers.0.mlp": "torch", "model.layers.2.mlp": "torch"}


@needs_v5
def test_pipeline_stages_are_refused_by_name(tp_checkpoint):
    from transformers import DistributedConfig

    for config in (DistributedConfig(pp_size=2), {"pp_size": 2}):
        with pytest.raises(ValueError, match=r"pp_size=2: pipeline parallelism is not supported \(transformers' "
                                             "pipeline stages replace the decoder layers"):
            AutoModelForCausalLM.from_pretrained(tp_checkpoint, distributed_config=config)


@pytest.mark.skipif(compat.IS_V5, reason="transformers 5.x runs tp_plan (test_tensor_parallel_equals_one_process)")
def test_tp_plan_needs_transformers_5(tp_checkpoint):
    for kwarg in ("tp_plan", "tp_size"):
        with pytest.raises(ValueError, match=rf"from_pretrained\({kwarg}=\.\.\.\): tensor parallelism needs "
                                             r"transformers 5\.x"):
            AutoModelForCausalLM.from_pretrained(tp_checkpoint, **{kwarg: "auto" if kwarg == "tp_plan" else 2})


# ------------------------------------------------------------------------------------- device_map and offload


@pytest.fixture(scope="module")
def fp_checkpoint(tmp_path_factory):
    return helpers.save_checkpoint(helpers.build_model("gqa", seed=7), str(tmp_path_factory.mktemp("fp")))


SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
         "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}


@pytest.mark.parametrize("placement", ["cpu_and_disk", "auto_max_memory_disk", "auto_max_memory_fits"])
@pytest.mark.parametrize("backend", ["torch", None], ids=["torch_backend", "default_backend"])
def test_offload_equals_the_model_in_memory(fp_checkpoint, tmp_path, placement, backend):
    """Layers on disk (read back by accelerate's hooks at each forward) or all in memory by max_memory, through
    transformers' loader on both stacks: the same logits (bit for bit on the torch backend; the default one may run
    the offloaded layers by the torch reference instead of the C++ op) and the same greedy tokens."""
    kwargs = {"cpu_and_disk": dict(device_map=SPLIT),
              "auto_max_memory_disk": dict(device_map="auto", max_memory={"cpu": "300KB"}),
              "auto_max_memory_fits": dict(device_map="auto", max_memory={"cpu": "1GB"})}[placement]
    reference = AutoModelForCausalLM.from_pretrained(fp_checkpoint, moe_backend=backend)
    model = AutoModelForCausalLM.from_pretrained(fp_checkpoint, offload_folder=str(tmp_path / "offload"),
                                                 moe_backend=backend, **kwargs)
    if placement == "auto_max_memory_fits":  # all in memory (transformers 5.x then keeps no hf_device_map)
        assert set(getattr(model, "hf_device_map", {"": "cpu"}).values()) == {"cpu"}
        assert all(p.device.type == "cpu" for p in model.parameters())
    else:
        assert set(model.hf_device_map.values()) == {"cpu", "disk"}, model.hf_device_map
        assert model.model.layers[2].mlp.experts[0].up_proj.weight.device.type == "meta"  # read at each forward
    got, expected = _logits_and_tokens(model, 6), _logits_and_tokens(reference, 6)
    real = expected[2]
    if backend == "torch":
        assert torch.equal(got[0][real], expected[0][real])
    else:
        assert helpers.row_error(got[0][real], expected[0][real]) < 1e-5
    assert torch.equal(got[1], expected[1])


def test_offload_in_bfloat16_without_an_offload_folder(fp_checkpoint):
    """A safetensors checkpoint needs no offload_folder: the disk layers are read back from its own shards (and
    converted to the requested dtype)."""
    reference = AutoModelForCausalLM.from_pretrained(fp_checkpoint, moe_backend="torch",
                                                     **compat.dtype_kwarg(torch.bfloat16))
    model = AutoModelForCausalLM.from_pretrained(fp_checkpoint, device_map=SPLIT, moe_backend="torch",
                                                 **compat.dtype_kwarg(torch.bfloat16))
    assert model.model.layers[1].mlp.experts[0].up_proj.weight.device.type == "meta"  # offloaded, not loaded
    got, expected = _logits_and_tokens(model, 6), _logits_and_tokens(reference, 6)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.fixture(scope="module")
def gptq_checkpoint(fp_checkpoint, tmp_path_factory):
    return quantize_checkpoint(fp_checkpoint, str(tmp_path_factory.mktemp("gptq")), bits=4, group_size=32, sym=True,
                               max_shard_size="150KB", progress=False)


@pytest.mark.parametrize("placement", ["cpu", "auto", "auto_max_memory", "per_module_cpu"])
def test_gptq_device_map_on_cpu(gptq_checkpoint, placement):
    """GPTQ checkpoints load through our streaming loader: every placement that stays in memory gives the logits
    and greedy tokens of the default load."""
    kwargs = {"cpu": dict(device_map="cpu"), "auto": dict(device_map="auto"),
              "auto_max_memory": dict(device_map="auto", max_memory={"cpu": "1GB"}),
              "per_module_cpu": dict(device_map={k: "cpu" for k in SPLIT})}[placement]
    dtype = compat.dtype_kwarg(torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(gptq_checkpoint, **dtype)
    model = AutoModelForCausalLM.from_pretrained(gptq_checkpoint, **dtype, **kwargs)
    assert all(t.device.type == "cpu" for t in list(model.parameters()) + list(model.buffers()))
    got, expected = _logits_and_tokens(model, 6), _logits_and_tokens(reference, 6)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("placement", ["dict", "auto_max_memory", "string"])
def test_gptq_disk_offload_is_refused_by_name(gptq_checkpoint, tmp_path, placement):
    kwargs = {"dict": dict(device_map=SPLIT), "string": dict(device_map="disk"),
              "auto_max_memory": dict(device_map="auto", max_memory={"cpu": "100KB"})}[placement]
    asked = {"dict": "device_map", "string": "device_map='disk'",
             "auto_max_memory": r"device_map='auto' with max_memory=\{'cpu': '100KB'\}"}[placement]
    with pytest.raises(ValueError, match=rf"{asked} puts '[\w. ]+' on disk: GPTQ layers cannot be offloaded to disk "
                                         r"\(offload_folder is for full-precision checkpoints\)"):
        AutoModelForCausalLM.from_pretrained(gptq_checkpoint, offload_folder=str(tmp_path), **kwargs)


@pytest.mark.skipif(not compat.IS_V5, reason="on transformers 4.38 tp_plan is refused before the checkpoint is "
                    "looked at (test_tp_plan_needs_transformers_5)")
@pytest.mark.parametrize("kwarg", ["tp_plan", "distributed_config"])
def test_gptq_tensor_parallel_is_refused_by_name(gptq_checkpoint, kwarg):
    from transformers import DistributedConfig

    value = "auto" if kwarg == "tp_plan" else DistributedConfig(tp_plan="auto")
    with pytest.raises(ValueError, match=rf"from_pretrained\({kwarg}=\.\.\.\): GPTQ checkpoints load through "
                                         "qwen2_moe_hf's own loader, which does not shard"):
        AutoModelForCausalLM.from_pretrained(gptq_checkpoint, **{kwarg: value})


# ------------------------------------------------------------------------------------------------ torch.compile


COMPILE_NEW_TOKENS = 6


@pytest.fixture
def compile_model():
    torch._dynamo.reset()
    yield helpers.build_model("gqa", seed=5)
    torch._dynamo.reset()


def _greedy(model, **kwargs):
    ids, mask, _ = helpers.parity_inputs(model.config.vocab_size)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=COMPILE_NEW_TOKENS,
                              min_new_tokens=COMPILE_NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None,
                              **kwargs)


@pytest.mark.skipif(not compat.IS_V5, reason="transformers 4.38's static cache works only for the models it was "
                    "written for (a model-side cache set up by _setup_cache); the 4.38 compile test is "
                    "test_compiled_forward_with_the_dynamic_cache")
def test_compiled_decode_with_a_static_cache(compile_model):
    """The user's way: forward compiled by inductor (graph breaks allowed: the input checks and the MoE dispatch
    run in Python), a static cache so the decode step has one shape: the eager greedy tokens."""
    eager = _greedy(compile_model)
    assert torch.equal(_greedy(compile_model, cache_implementation="static"), eager)
    compile_model.forward = torch.compile(compile_model.forward, dynamic=False)
    assert torch.equal(_greedy(compile_model, cache_implementation="static"), eager)


@pytest.mark.skipif(not compat.IS_V5, reason="generate's compile_config is transformers 5.x's")
def test_generate_compiles_the_decode_step(compile_model):
    """transformers' way: a static cache and a compile_config make generate compile the decode step itself (on
    CPU only when asked to: `_compile_all_devices`, transformers' own switch for this)."""
    from transformers import CompileConfig

    eager = _greedy(compile_model)
    config = CompileConfig(backend="aot_eager", dynamic=False, mode=None)
    config._compile_all_devices = True
    assert torch.equal(_greedy(compile_model, cache_implementation="static", compile_config=config), eager)
    assert hasattr(compile_model, "_compiled_call")  # generate did compile (get_compiled_call)


def test_compiled_forward_with_the_dynamic_cache(compile_model):
    """Both stacks: the forward compiled with dynamic shapes, generate's default cache (DynamicCache) growing by
    one token a step: the eager greedy tokens. One decoder layer: dynamo compiles each layer's frames again (their
    guards hold the layer module), ~10 s of CI a layer, and the graph over a growing cache is the same for each."""
    model = helpers.build_model("gqa", seed=5, num_hidden_layers=1)
    eager = _greedy(model)
    model.forward = torch.compile(model.forward, backend="aot_eager", dynamic=True)
    assert torch.equal(_greedy(model), eager)

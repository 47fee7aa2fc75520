"""With the real libraries, as a user fine-tunes and serves: PEFT LoRA on attention and on the expert projections
through `transformers.Trainer` (the loss goes down, only the adapters move), adapters saved, reloaded and merged,
and `pipeline("text-generation")`. The newest stack has the current peft, the blog-era stack peft 0.9.0."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, pipeline

from qwen2_moe_hf.kernels.build import load_cpu_ops

import helpers

CPU_OPS = load_cpu_ops()[0]

peft = pytest.importorskip("peft", reason="peft is not installed (both stacks of run_all.sh install it)")

TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]  # attention, routed and shared experts


class _Rows(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


def _lora_model(seed=0):
    model = helpers.build_model("gqa", seed=seed)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    return model, peft.get_peft_model(model, config)


def _loss(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_lora_with_trainer_lowers_the_loss_and_moves_only_the_adapters(tmp_path):
    base, model = _lora_model()
    wrapped = {n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert any(".mlp.experts.3.down_proj" in n for n in wrapped) and any("self_attn.q_proj" in n for n in wrapped)
    assert any(".mlp.shared_expert.up_proj" in n for n in wrapped)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids = torch.randint(1, 128, (16, 12), generator=torch.Generator().manual_seed(0))
    before = _loss(model, ids)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_train_epochs=15,
                             learning_rate=2e-2, logging_steps=5, save_strategy="no", report_to=[],
                             use_cpu=True, seed=0, dataloader_num_workers=0)
    result = Trainer(model=model, args=args, train_dataset=_Rows(ids)).train()
    after = _loss(model, ids)
    assert after < 0.8 * before, (before, after, result)
    for name, tensor in model.named_parameters():
        if name in frozen:
            assert torch.equal(tensor, frozen[name]), f"{name} is not an adapter and moved"


def test_adapters_save_reload_and_merge(tmp_path):
    base, model = _lora_model(seed=1)
    with torch.no_grad():  # adapters that change the outputs (PEFT starts B at zero)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    model.eval()
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        adapted = model(ids).logits
        # LoRA-wrapped experts run on the torch reference (it runs the adapters); no fast backend reads them.
        assert helpers.resolved_backend(model.get_base_model().model.layers[0].mlp, x) == "torch"
    model.save_pretrained(str(tmp_path / "adapter"))
    fresh = helpers.build_model("gqa", seed=1)
    reloaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, adapted, rtol=0, atol=0)
    merged = reloaded.merge_and_unload().eval()
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged.modules())
    with torch.no_grad():
        # The merged experts are plain Linears again: the fast backend serves them where it is built.
        assert helpers.resolved_backend(merged.model.layers[0].mlp, x) == ("cpu" if CPU_OPS else "torch")
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-4, atol=1e-4)


def test_text_generation_pipeline_equals_generate(tmp_path):
    from qwen2_moe_hf.demo import build_demo_checkpoint

    path = build_demo_checkpoint(str(tmp_path / "demo"), train_steps=0)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompt = "Qwen is"
    text = generator(prompt, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    ids = tokenizer([prompt], return_tensors="pt")
    expected = model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert text == tokenizer.decode(expected, skip_special_tokens=True)


@pytest.fixture(scope="module")
def gptq_path(tmp_path_factory):
    """A GPTQ-Int4 checkpoint (attention, routed and shared experts quantized) made from a tiny random model."""
    from qwen2_moe_hf.gptq.quantize import quantize_checkpoint

    root = tmp_path_factory.mktemp("lora-gptq")
    helpers.save_checkpoint(helpers.build_model("gqa", seed=2), str(root / "fp"))
    return quantize_checkpoint(str(root / "fp"), str(root / "gptq"), group_size=32, progress=False)


def _gptq_model(path):
    from qwen2_moe_hf import compat

    return AutoModelForCausalLM.from_pretrained(path, **compat.dtype_kwarg(torch.float32)).eval()


def _peft_has_custom_layers():
    return hasattr(peft.LoraConfig, "_register_custom_module")


def test_plain_lora_config_stops_at_gptq_layers_and_ours_says_which_peft(gptq_path):
    from qwen2_moe_hf.lora import PEFT_CUSTOM_LAYERS_VERSION, lora_config

    with pytest.raises(ValueError, match="not supported"):  # PEFT's own words for a layer type it does not know
        peft.get_peft_model(_gptq_model(gptq_path), peft.LoraConfig(r=4, target_modules=["gate_proj"]))
    if not _peft_has_custom_layers():
        with pytest.raises(RuntimeError, match=f"peft >= {PEFT_CUSTOM_LAYERS_VERSION}.*{peft.__version__}"):
            lora_config(r=4, target_modules=["gate_proj"])


@pytest.mark.skipif(not _peft_has_custom_layers(), reason=f"peft {peft.__version__} has no custom layer dispatch "
                    "(LoRA on GPTQ layers needs peft >= 0.12; the newest stack has it)")
def test_lora_on_gptq_experts_trains_saves_reloads_and_refuses_to_merge(gptq_path, tmp_path, recwarn):
    from qwen2_moe_hf.gptq.linear import GPTQLinear, kernel_for
    from qwen2_moe_hf.lora import lora_config

    model = peft.get_peft_model(_gptq_model(gptq_path), lora_config(r=8, lora_alpha=16, target_modules=TARGETS,
                                                                     lora_dropout=0.0, task_type="CAUSAL_LM"))
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    for needle in (".mlp.experts.3.down_proj", ".mlp.shared_expert.up_proj", "self_attn.q_proj"):
        name = next(n for n in wrapped if n.endswith(needle))
        assert isinstance(wrapped[name].get_base_layer(), GPTQLinear), name
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    frozen.update({n: b.detach().clone() for n, b in model.named_buffers() if n.endswith("qweight")})
    ids = torch.randint(1, 128, (16, 12), generator=torch.Generator().manual_seed(0))
    before = _loss(model, ids)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_train_epochs=15,
                             learning_rate=2e-2, logging_steps=5, save_strategy="no", report_to=[],
                             use_cpu=True, seed=0, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=_Rows(ids)).train()
    after = _loss(model, ids)
    assert after < 0.8 * before, (before, after)
    moved = dict(model.named_parameters())
    moved.update(model.named_buffers())
    for name, tensor in frozen.items():
        assert torch.equal(moved[name], tensor), f"{name} is not an adapter and moved"

    model.eval()
    x = torch.randn(3, 64)
    assert kernel_for(x, 4) == ("cpu" if CPU_OPS else "torch")  # inference: the int4 kernel under the adapters
    with torch.no_grad():
        adapted = model(ids).logits
    model.save_pretrained(str(tmp_path / "adapter"))
    fresh = _gptq_model(gptq_path)
    reloaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"),
                                              config=lora_config(str(tmp_path / "adapter"))).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, adapted, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="cannot be merged into int4 GPTQ weights.*quantize"):
        reloaded.merge_and_unload()
    assert not [w for w in recwarn if "Unsupported layer type" in str(w.message)]  # nothing the user can act on

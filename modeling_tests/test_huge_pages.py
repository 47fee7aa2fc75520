"""Weights moved into memory advised for 2 MiB pages (loading/pages.py, kernels' huge_pages.h): the allocator's
layout and its freeing, and a moved model computing bit for bit what it computed before, with its tied weights,
parameters and saved checkpoint unchanged."""

import os
import sys

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from qwen2_moe_hf import compat
from qwen2_moe_hf.gptq.linear import GPTQLinear
from qwen2_moe_hf.gptq.quantize import quantize_checkpoint
from qwen2_moe_hf.kernels.build import cpu_module, load_cpu_ops
from qwen2_moe_hf.loading import pages

from helpers import build_model, save_checkpoint

CPU_OPS, CPU_OPS_WHY = load_cpu_ops()
pytestmark = pytest.mark.skipif(not CPU_OPS, reason=f"CPU ops unavailable: {CPU_OPS_WHY}")
MIB = 1 << 20
THP = pages.thp_mode()
# Where the kernel has no transparent huge pages (or is not Linux) nothing is moved, and the tests of the move skip.
moves = pytest.mark.skipif(THP in ("never", ""), reason=f"transparent huge pages unavailable here (mode {THP!r})")


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_tensors_lie_back_to_back_from_a_huge_page_boundary_each_its_own_storage():
    sizes = [3 * MIB, 100, 0, 5000, MIB]
    tensors, advised = cpu_module().huge_page_tensors(sizes)
    if THP in ("always", "madvise"):
        assert advised
    assert [t.numel() for t in tensors] == sizes and all(t.dtype == torch.uint8 for t in tensors)
    starts = [t.untyped_storage().data_ptr() for t in tensors]
    if sys.platform.startswith("linux"):
        assert starts[0] % (2 * MIB) == 0
        spans = [-(-max(n, 1) // 4096) * 4096 for n in sizes]
        assert [b - a for a, b in zip(starts, starts[1:])] == spans[:-1]
    assert len({id(t.untyped_storage()) for t in tensors}) == len(tensors)
    assert [t.untyped_storage().nbytes() for t in tensors] == sizes
    for i, t in enumerate(tensors):
        t.fill_(i + 1)  # no piece writes into another
    assert [int(t.sum()) for t in tensors] == [(i + 1) * n for i, n in enumerate(sizes)]


@pytest.mark.parametrize("bad", [-1, 1 << 47])
def test_a_size_out_of_range_is_refused_by_index(bad):
    with pytest.raises(ValueError, match=r"nbytes\[1\]"):
        cpu_module().huge_page_tensors([4096, bad])


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm to read the RSS")
def test_each_freed_tensor_hands_its_own_pages_back():
    tensors, _ = cpu_module().huge_page_tensors([64 * MIB] * 4)
    for i, t in enumerate(tensors):
        t.fill_(i + 1)
    held = rss_bytes()
    del tensors[1:3]  # the middle two: the mapping's other tensors stay
    assert held - rss_bytes() >= 100 * MIB
    assert int(tensors[0][::4096].sum()) == 1 * (64 * MIB // 4096)
    assert int(tensors[1][::4096].sum()) == 4 * (64 * MIB // 4096)


def slots(model):
    return {f"{name}.{key}": t for name, m in model.named_modules()
            for d in (m._parameters, m._buffers) for key, t in d.items() if t is not None}


def load(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, **compat.dtype_kwarg(kwargs.pop("dtype", torch.float32)),
                                                **kwargs)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A full-precision checkpoint with tied embeddings and its GPTQ-Int4 quantization."""
    fp = str(tmp_path_factory.mktemp("fp"))
    save_checkpoint(build_model("gqa", seed=5, tie_word_embeddings=True), fp)
    gptq = str(tmp_path_factory.mktemp("gptq"))
    quantize_checkpoint(fp, gptq, bits=4, group_size=32, sym=True, progress=False)
    return {"fp": fp, "gptq": gptq}


@moves
@pytest.mark.parametrize("kind", ["fp", "gptq"])
def test_from_pretrained_moves_the_weights_and_computes_the_same(checkpoints, kind, monkeypatch, tmp_path):
    """QWEN2_MOE_HF_HUGE_PAGES=1: every large tensor (here every tensor: the threshold lowered for a tiny model)
    moves to page-aligned huge-page memory; parameters stay parameters, tied weights one object; logits, greedy
    tokens and the saved checkpoint are the same as without."""
    plain = load(checkpoints[kind])
    monkeypatch.setattr(pages, "MIN_BYTES", 1)
    monkeypatch.setenv(pages.ENV_HUGE_PAGES, "1")
    moved = load(checkpoints[kind])
    before, after = slots(plain), slots(moved)
    assert before.keys() == after.keys()
    for name, t in after.items():
        assert t.data_ptr() % 4096 == 0, name
        assert type(t) is type(before[name]) and t.requires_grad == before[name].requires_grad, name
        assert t.dtype == before[name].dtype and torch.equal(t, before[name]), name
    assert moved.lm_head.weight is moved.model.embed_tokens.weight
    if kind == "gptq":
        assert any(isinstance(m, GPTQLinear) and m.blocked for m in moved.modules())
    ids = torch.randint(1, plain.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        assert torch.equal(moved(ids).logits, plain(ids).logits)
        assert torch.equal(moved.generate(ids, **kwargs), plain.generate(ids, **kwargs))
    moved.save_pretrained(str(tmp_path / "saved"))
    monkeypatch.delenv(pages.ENV_HUGE_PAGES)
    again = load(str(tmp_path / "saved"))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, plain(ids).logits)


def test_without_the_switch_nothing_moves(checkpoints, monkeypatch):
    monkeypatch.setattr(pages, "MIN_BYTES", 1)
    monkeypatch.delenv(pages.ENV_HUGE_PAGES, raising=False)
    model = load(checkpoints["fp"])
    # a tensor the move would have put on a page boundary is left where the loader put it
    assert any(t.data_ptr() % 4096 for t in slots(model).values())


@moves
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_moe_layers_read_the_moved_weights_not_the_old_ones(dtype, monkeypatch):
    """After a forward (the experts' prepared weights built on the old tensors), the move and then the old tensors
    overwritten with zeros: the logits do not change, so nothing reads the old memory."""
    model = build_model("gqa", seed=7).to(dtype)
    ids = torch.randint(1, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
    old = list(slots(model).values())
    monkeypatch.setattr(pages, "MIN_BYTES", 1)
    moved = pages.hold_in_huge_pages(model)
    assert moved >= sum(t.numel() * t.element_size() for t in old)
    with torch.no_grad():
        for t in old:
            t.zero_()
        assert torch.equal(model(ids).logits, want)
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


def test_a_model_with_nothing_large_enough_is_left_as_it_is(checkpoints, monkeypatch):
    """The tiny model's tensors are all under MIN_BYTES: the switch on, the load still works and moves nothing."""
    monkeypatch.setenv(pages.ENV_HUGE_PAGES, "1")
    model = load(checkpoints["gptq"])
    assert all(t.numel() * t.element_size() < pages.MIN_BYTES for t in slots(model).values())
    before = {name: t for name, t in slots(model).items()}
    assert pages.hold_in_huge_pages(model) == 0
    assert all(slots(model)[name] is t for name, t in before.items())


@moves
def test_two_tensors_over_one_storage_stay_aliases(monkeypatch):
    """A buffer that is a view of a parameter's whole storage: copying each would make them two; both stay."""
    model = build_model("gqa", seed=1)
    norm = model.model.norm
    norm.register_buffer("alias", norm.weight.detach().view(-1))
    monkeypatch.setattr(pages, "MIN_BYTES", 1)
    pages.hold_in_huge_pages(model)
    assert norm.alias.data_ptr() == norm.weight.data_ptr()
    with torch.no_grad():
        norm.weight.mul_(2)
    assert torch.equal(norm.alias, norm.weight.detach())
    assert model.lm_head.weight.data_ptr() % 4096 == 0  # the others did move

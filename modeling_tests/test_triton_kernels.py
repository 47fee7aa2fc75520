"""The dense variants of the Triton kernel family (qwen2_moe_hf/kernels/triton_moe.py: INT4=False) under
TRITON_INTERPRET=1 (CPU), fp16 and fp32, against the torch reference; and the tile table
(qwen2_moe_hf/kernels/triton_configs.py): its picks, its every configuration (dense and int4) computing right under
the interpreter, the fused weighting and combine, forced configurations, the tuner's table and its JSON override.
Triton's interpreter reads bf16 wrongly (../shared/NOTES.md), so bf16 is left to the GPU suite (and the AOT
compile, test_triton_aot.py)."""

import copy
import os

import pytest
import torch

from helpers import row_error

# conftest.py sets TRITON_INTERPRET=1 before anything imports triton when there is no GPU.
triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e .[triton])")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

from qwen2_moe_hf.gptq import format as gptq_format  # noqa: E402
from qwen2_moe_hf.kernels import triton_configs as tc  # noqa: E402
from qwen2_moe_hf.kernels import triton_moe  # noqa: E402
from qwen2_moe_hf.moe import experts_forward_reference, route  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-2}


class _Expert(torch.nn.Module):
    def __init__(self, hidden, inter, gen):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=False)
        self.act_fn = torch.nn.SiLU()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _case(tokens, experts, k, hidden, inter, dtype, seed=0, ids=None):
    gen = torch.Generator().manual_seed(seed)
    bank = torch.nn.ModuleList([_Expert(hidden, inter, gen) for _ in range(experts)]).to(DEVICE, dtype)
    x = torch.randn(tokens, hidden, generator=gen).to(DEVICE, dtype)
    logits = torch.randn(tokens, experts, generator=gen).to(DEVICE)
    weights, topk = route(logits, k, False)
    if ids is not None:
        topk = ids.to(DEVICE)
    return bank, x, topk, weights.to(dtype)


def _check(bank, x, ids, weights, dtype, **kw):
    tables = triton_moe.expert_tables([e.gate_proj.weight for e in bank], [e.up_proj.weight for e in bank],
                                      [e.down_proj.weight for e in bank], int4=False)
    got = triton_moe.routed_experts(x, ids, weights, tables, **kw)
    with torch.no_grad():
        ref = experts_forward_reference(x.float(), ids, weights.float(), bank.float())
    err = row_error(got, ref)
    assert err <= TOL[dtype], f"per-row relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens", [1, 3, 21])  # 1 and 3: the decode path; 21: sorted, grouped GEMMs
def test_routed_experts_match_reference(dtype, tokens):
    bank, x, ids, weights = _case(tokens, experts=5, k=2, hidden=48, inter=40, dtype=dtype, seed=tokens)
    _check(bank, x, ids, weights, dtype)


@pytest.mark.parametrize("path", ["decode", "grouped"])
def test_corner_cases(path):
    kw = dict(decode_max_tokens=64 if path == "decode" else 0)
    dtype = torch.float32
    bank, x, ids, weights = _case(9, experts=6, k=2, hidden=32, inter=24, dtype=dtype,
                                  ids=torch.tensor([[3, 3]] * 9))  # all slots on one expert
    _check(bank, x, ids, weights, dtype, **kw)
    bank, x, ids, weights = _case(7, experts=6, k=2, hidden=32, inter=24, dtype=dtype,
                                  ids=torch.tensor([[0, 5]] * 7))  # experts 1-4 idle
    _check(bank, x, ids, weights, dtype, **kw)


def test_align_matches_the_cpu_op_contract():
    ids = torch.randint(0, 7, (19, 3), generator=torch.Generator().manual_seed(0))
    sorted_slots, block_experts = triton_moe.align_torch(ids, 7, 16)
    from qwen2_moe_hf.kernels.build import load_cpu_ops

    ok, why = load_cpu_ops()
    if not ok:
        pytest.skip(f"CPU ops unavailable: {why}")
    ref_slots, ref_blocks, _ = torch.ops.qwen2_moe_hf.moe_align(ids, 7, 16)
    assert torch.equal(sorted_slots.cpu(), ref_slots) and torch.equal(block_experts.cpu(), ref_blocks)


def _tables(bank):
    return triton_moe.expert_tables([e.gate_proj.weight for e in bank], [e.up_proj.weight for e in bank],
                                    [e.down_proj.weight for e in bank], int4=False)


@pytest.mark.parametrize("path", ["decode", "sorted"])
@pytest.mark.parametrize("bad", [-1, 6, 2 ** 40])
def test_out_of_range_expert_ids_are_refused_before_any_launch(path, bad, monkeypatch):
    kw = dict(decode_max_tokens=64 if path == "decode" else 0)
    bank, x, ids, weights = _case(9, experts=6, k=2, hidden=32, inter=24, dtype=torch.float32)
    ids = ids.clone()
    ids[4, 1] = bad
    launched = []
    for name in ("_decode_gemm1", "_gemm1", "_combine"):
        monkeypatch.setattr(triton_moe, name, _Recorder(launched, getattr(triton_moe, name)))
    with pytest.raises(ValueError, match=r"^topk_ids: 1 expert id\(s\) outside \[0, 6\), e\.g\. " + str(bad)):
        triton_moe.routed_experts(x, ids, weights, _tables(bank), **kw)
    assert not launched


class _Recorder:
    def __init__(self, log, kernel):
        self.log, self.kernel = log, kernel

    def __getitem__(self, grid):
        self.log.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("path", ["decode", "sorted"])
def test_unchecked_out_of_range_ids_add_nothing_and_read_nothing_past_the_table(path, monkeypatch):
    """check_ids=False (as under torch.compile / CUDA graphs): the kernels clamp the id for the table and the combine
    leaves the slot out; the sorted path's align leaves it out as the CUDA moe_align does (align_torch here: the CPU
    twin raises instead)."""
    kw = dict(decode_max_tokens=64 if path == "decode" else 0)
    monkeypatch.setattr(triton_moe, "align", triton_moe.align_torch)
    bank, x, ids, weights = _case(11, experts=6, k=3, hidden=32, inter=24, dtype=torch.float32, seed=3)
    ids = ids.clone()
    ids[2, 0], ids[5, 2], ids[9, 1] = -3, 6, 1000
    got = triton_moe.routed_experts(x, ids, weights, _tables(bank), check_ids=False, **kw)
    kept = (ids >= 0) & (ids < 6)
    with torch.no_grad():
        ref = experts_forward_reference(x.float(), torch.where(kept, ids, 0), torch.where(kept, weights, 0).float(),
                                        bank.float())
    assert row_error(got, ref) <= TOL[torch.float32]


def test_align_torch_leaves_out_of_range_ids_out():
    ids = torch.tensor([[0, 7], [-1, 2], [2, 0], [3, 99]])
    sorted_slots, block_experts = triton_moe.align_torch(ids, 4, 4)
    slots = ids.numel()
    real = sorted_slots[sorted_slots < slots].tolist()
    assert real == [0, 5, 3, 4, 6]  # every in-range slot once, by expert (0, 0, 2, 2, 3), the others nowhere
    assert block_experts.tolist()[:4] == [0, 2, 3, -1]


def test_routed_experts_checks_its_index_arguments():
    bank, x, ids, weights = _case(3, experts=3, k=2, hidden=32, inter=24, dtype=torch.float32)
    tables = _tables(bank)
    with pytest.raises(ValueError, match=r"^topk_ids: expected an int64 or int32 tensor"):
        triton_moe.routed_experts(x, ids.float(), weights, tables)
    with pytest.raises(ValueError, match=r"^topk_ids: shape \(2, 2\), expected \[3, top_k\] \(one row per row"):
        triton_moe.routed_experts(x, ids[:2], weights[:2], tables)
    with pytest.raises(ValueError, match=r"^topk_weights: expected a floating-point tensor"):
        triton_moe.routed_experts(x, ids, ids, tables)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match=r"^topk_ids: on meta, but x is on cpu"):
            triton_moe.routed_experts(x, ids.to("meta"), weights, tables)
    ref = triton_moe.routed_experts(x, ids, weights, tables)
    assert torch.equal(triton_moe.routed_experts(x, ids.int(), weights, tables), ref)  # int32 ids too


def test_dense_tables_check_their_weights():
    bank, x, ids, weights = _case(3, experts=3, k=2, hidden=32, inter=24, dtype=torch.float32)
    gate, up, down = ([getattr(e, p).weight for e in bank] for p in ("gate_proj", "up_proj", "down_proj"))
    with pytest.raises(ValueError, match=r"^up\[1\]: shapes"):
        triton_moe.expert_tables(gate, up[:1] + [up[1][:, :16].contiguous()] + up[2:], down, int4=False)
    with pytest.raises(ValueError, match=r"^down\[0\]: expected a contiguous"):
        triton_moe.expert_tables(gate, up, [down[0].t()] + down[1:], int4=False)
    with pytest.raises(ValueError, match=r"^down: shapes"):
        triton_moe.expert_tables(gate, up, [g.t().contiguous()[:16] for g in gate], int4=False)
    tables = triton_moe.expert_tables(gate, up, down, int4=False)
    with pytest.raises(ValueError, match=r"^x: dtype torch.float16"):
        triton_moe.routed_experts(x.half(), ids, weights.half(), tables)


def test_misaligned_weights_are_refused():
    bank, x, ids, weights = _case(3, experts=2, k=2, hidden=32, inter=24, dtype=torch.float32)
    gate, up, down = ([getattr(e, p).weight.detach() for e in bank] for p in ("gate_proj", "up_proj", "down_proj"))
    odd = torch.empty(24 * 32 + 1, device=DEVICE)[1:].view(24, 32)  # 4 bytes past an aligned address
    odd.copy_(up[1])
    with pytest.raises(ValueError, match=r"^up\[1\]: data not 16-byte aligned"):
        triton_moe.expert_tables(gate, [up[0], odd], down, int4=False)


# ---------------------------------------------------------------------------------------------------------------
# The tile table (kernels/triton_configs.py)

CAPS = {"sm80": (8, 0), "sm90": (9, 0)}


def test_the_table_covers_every_generation_and_dtype_class():
    tables = tc.builtin_tables()
    for gen in tc.GENERATIONS:
        for cls in tc.DTYPE_CLASSES:
            entries = tables["sorted"][(gen, cls)]
            bounds = [b for b, _ in entries]
            assert bounds[-1] is None and bounds[:-1] == sorted(bounds[:-1])
            for _, cfg in entries:
                tc.check_block_m(cfg.block_m)
                tc.check_tile(cfg.gemm1)
                tc.check_tile(cfg.gemm2)
            decode = tables["decode"][(gen, cls)]
            tc.check_tile(decode.gemv1)
            tc.check_tile(decode.gemv2)
        for cls in ("int4", "fp32"):
            for _, cfg in tables["linear"][(gen, cls)]:
                tc.check_block_m(cfg.block_m)
                tc.check_tile(cfg.tile)
    # the JSON form round-trips
    assert tc.tables_from_json(tc.tables_to_json(tables)) == tables


def test_picks_follow_generation_dtype_and_slots_per_expert():
    assert [tc.generation(c) for c in [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0), None]] == \
        ["sm80", "sm80", "sm80", "sm90", "sm90", "sm80", "sm90"]
    assert [tc.dtype_class(d, i) for d, i in [("torch.bfloat16", False), ("float16", True), ("torch.float32", True),
                                             ("float32", False)]] == ["16bit", "int4", "fp32", "fp32"]
    with pytest.raises(ValueError, match="dtype"):
        tc.dtype_class("int8", False)
    for cap in CAPS.values():
        # Qwen1.5-MoE: 60 experts, top-4. Rows per block grow with the slots each expert gets.
        ms = [tc.pick_sorted(cap, "bfloat16", False, t, 4, 60).block_m for t in (5, 64, 256, 1024, 4096, 16384)]
        assert ms == sorted(ms) and ms[0] == 16 and ms[-1] >= 64, ms
        # slots per expert, not tokens: 8 experts fill a block with fewer tokens than 60 do
        assert tc.pick_sorted(cap, "bfloat16", False, 256, 2, 8).block_m > \
            tc.pick_sorted(cap, "bfloat16", False, 256, 2, 60).block_m
        # fp16 and bf16 share entries; fp32 has its own (dense or 4-bit); a pure function of its arguments
        assert tc.pick_sorted(cap, "float16", False, 300, 4, 60) == tc.pick_sorted(cap, "bfloat16", False, 300, 4, 60)
        assert tc.pick_sorted(cap, "float32", True, 300, 4, 60) == tc.pick_sorted(cap, "float32", False, 300, 4, 60)
        assert tc.pick_linear(cap, "float16", 1).block_m == 16 and tc.pick_linear(cap, "float16", 4096).block_m == 64
    assert tc.pick_sorted((9, 0), "bfloat16", False, 4096, 4, 60) != tc.pick_sorted((8, 0), "bfloat16", False, 4096,
                                                                                    4, 60)


def test_every_builtin_entry_is_a_tuning_candidate():
    # so that a re-tune (gpu_suite.py --tune) can keep any default it cannot beat
    for kernel, gen, cls, block_m, tile in tc.launchable(tc.builtin_tables()):
        if kernel != "combine" and cls in ("16bit", "int4"):
            assert (block_m, tile) in tc.candidates(kernel, cls), (kernel, gen, cls, block_m, tile)


def _bucket_tokens(entries, top_k, experts):
    """One token count inside each bucket of a sorted-path table (more than the decode path's 4 tokens)."""
    tokens, low = [], 0
    for bound, _ in entries:
        slots = low + 1 if bound is None else bound
        tokens.append(max(5, int(slots * experts / top_k)))
        low = slots if bound is not None else low
    return tokens


def _dense_check(cap, dtype, tokens, hidden, inter, experts=4, k=2, seed=0):
    bank, x, ids, weights = _case(tokens, experts=experts, k=k, hidden=hidden, inter=inter, dtype=dtype, seed=seed)
    _check(bank, x, ids, weights, dtype, capability=cap)


def _distinct_picks(dtype, int4, top_k, experts):
    """(capability, tokens) covering every distinct configuration of both generations' tables for this dtype (the
    decode path first): each bucket of each generation once, a configuration two generations share once."""
    cls = tc.dtype_class(str(dtype), int4)
    seen, out = set(), []
    for gen, cap in CAPS.items():
        decode = tc.pick_decode(cap, str(dtype), int4)
        if decode not in seen:
            seen.add(decode)
            out.append((cap, 2))
        entries = tc.builtin_tables()["sorted"][(gen, cls)]
        for tokens, (_, cfg) in zip(_bucket_tokens(entries, top_k, experts), entries):
            assert tc.pick_sorted(cap, str(dtype), int4, tokens, top_k, experts) == cfg  # one count per bucket
            if cfg not in seen:
                seen.add(cfg)
                out.append((cap, tokens))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_table_configuration_computes_right_dense(dtype):
    """Every configuration the launcher picks on either generation for this dtype (the decode path and each sorted
    bucket, up to 128 x 256 x 64 tiles), at a shape every BLOCK_K divides (the unmasked-K code the real model runs),
    and the largest at a ragged shape, against the torch reference."""
    picks = _distinct_picks(dtype, False, top_k=2, experts=4)
    for i, (cap, tokens) in enumerate(picks):
        _dense_check(cap, dtype, tokens, hidden=256, inter=128, seed=i)
    _dense_check(picks[-1][0], dtype, picks[-1][1], hidden=200, inter=72, seed=7)  # masked K, partial N tiles
    _dense_check(picks[0][0], dtype, 3, hidden=200, inter=72, seed=8)


def _int4_bank(experts, hidden, inter, group, gen, zero_offset=1):
    def linear(k, n):
        w = torch.randn(n, k, generator=gen) / k ** 0.5
        t = gptq_format.quantize_rtn(w, 4, group, False, zero_offset)
        return tuple(t[name].to(DEVICE) for name in ("qweight", "qzeros", "scales", "g_idx"))

    return ([linear(hidden, inter) for _ in range(experts)], [linear(hidden, inter) for _ in range(experts)],
            [linear(inter, hidden) for _ in range(experts)])


def _deq(lin, zero_offset=1):
    return gptq_format.dequantize(*lin, bits=4, zero_offset=zero_offset, dtype=torch.float32)


def _int4_reference(x, ids, weights, gate, up, down):
    x, out = x.float(), torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        token, slot = torch.where(ids == e)
        xe = x[token]
        act = torch.nn.functional.silu(xe @ _deq(gate[e]).t()) * (xe @ _deq(up[e]).t())
        out.index_add_(0, token, (act @ _deq(down[e]).t()) * weights[token, slot, None].float())
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_table_configuration_computes_right_int4(dtype):
    """The same for 4-bit experts (fp16 activations: the int4 class; fp32: the fp32 class), and the GPTQ Linear at
    a row count in each of its buckets."""
    cls = tc.dtype_class(str(dtype), True)
    gen_ = torch.Generator().manual_seed(3)
    experts, k, hidden, inter = 4, 2, 256, 128
    gate, up, down = _int4_bank(experts, hidden, inter, 64, gen_)
    tables = triton_moe.expert_tables(gate, up, down, int4=True, zero_offset=1)
    for cap, tokens in _distinct_picks(dtype, True, top_k=k, experts=experts):
        x = torch.randn(tokens, hidden, generator=gen_).to(DEVICE, dtype)
        ids = torch.stack([torch.randperm(experts, generator=gen_)[:k] for _ in range(tokens)]).to(DEVICE)
        weights = torch.softmax(torch.randn(tokens, k, generator=gen_), -1).to(DEVICE, dtype)
        got = triton_moe.routed_experts(x, ids, weights, tables, capability=cap)
        err = row_error(got, _int4_reference(x, ids, weights, gate, up, down))
        assert err <= TOL[dtype], f"{cap} {dtype} {tokens} tokens: per-row relative error {err:.2e}"
    lin = _int4_bank(1, hidden, inter, 64, gen_)[0][0]
    seen = set()
    for gen, cap in CAPS.items():
        for bound, cfg in tc.builtin_tables()["linear"][(gen, cls)]:
            rows = int(bound) if bound is not None else 80
            assert tc.pick_linear(cap, str(dtype), rows) == cfg
            if cfg in seen:
                continue
            seen.add(cfg)
            x = torch.randn(rows, hidden, generator=gen_).to(DEVICE, dtype)
            got = triton_moe.gptq_linear_triton(x, *lin, capability=cap)
            err = row_error(got, x.float() @ _deq(lin).t())
            assert err <= TOL[dtype], f"linear {gen} {dtype} {rows} rows: per-row relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------------------------
# The weighted top-k sum: routing weight in GEMM2's epilogue, one combine


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_combine_sums_in_fp32_in_slot_order_and_rounds_once(dtype):
    gen = torch.Generator().manual_seed(0)
    tokens, k, hidden = 5, 4, 3000  # hidden: three column tiles, the last partial
    y = torch.randn(tokens * k, hidden, generator=gen) * 10
    y[0::k] = 3e4 if dtype == torch.float16 else 3e30  # cancels against the next slot: rounding order matters
    y[1::k] = -y[0::k]
    y = y.to(DEVICE, dtype)
    ids = torch.zeros(tokens, k, dtype=torch.long, device=DEVICE)
    got = triton_moe.combine(y, ids, 1)
    rows = y.view(tokens, k, hidden).float()
    want = rows[:, 0]
    for j in range(1, k):
        want = want + rows[:, j]
    assert got.dtype == dtype and torch.equal(got, want.to(dtype))


@pytest.mark.parametrize("path", ["decode", "sorted"])
def test_routing_weights_are_applied_once_and_results_are_deterministic(path):
    kw = dict(decode_max_tokens=64 if path == "decode" else 0)
    for dtype in (torch.float32, torch.float16):
        bank, x, ids, weights = _case(7, experts=5, k=3, hidden=64, inter=32, dtype=dtype, seed=5)
        tables = triton_moe.expert_tables([e.gate_proj.weight for e in bank], [e.up_proj.weight for e in bank],
                                          [e.down_proj.weight for e in bank], int4=False)
        first = triton_moe.routed_experts(x, ids, weights, tables, **kw)
        assert torch.equal(first, triton_moe.routed_experts(x, ids, weights, tables, **kw))  # bit for bit
        # doubling every weight doubles every output exactly (a power of two commutes with each rounding)
        assert torch.equal(triton_moe.routed_experts(x, ids, weights * 2, tables, **kw), first * 2)
        # a zero weight drops that slot's expert (the reference on a copy: .float() converts a module in place,
        # which would leave the address table pointing at freed storage)
        zeroed = weights.clone()
        zeroed[:, 2] = 0
        want = experts_forward_reference(x.float(), ids[:, :2], weights[:, :2].float(), copy.deepcopy(bank).float())
        assert row_error(triton_moe.routed_experts(x, ids, zeroed, tables, **kw), want) <= TOL[dtype]


# ---------------------------------------------------------------------------------------------------------------
# Forcing a configuration; the tuner's table and its JSON override


def test_forced_configurations_and_overrides():
    dtype = torch.float32
    bank, x, ids, weights = _case(11, experts=4, k=2, hidden=64, inter=48, dtype=dtype, seed=2)
    forced = tc.SortedConfig(32, tc.Tile(16, 16, 4, 2), tc.Tile(32, 16, 2, 1))
    _check(bank, x, ids, weights, dtype, config=forced, decode_max_tokens=0)
    _check(bank, x, ids, weights, dtype, config=tc.DecodeConfig(tc.Tile(8, 16), tc.Tile(64, 64)),
           decode_max_tokens=64)
    _check(bank, x, ids, weights, dtype, block_m=64, block_n=16, block_k=16, decode_max_tokens=0)
    with pytest.raises(ValueError, match="block_m"):
        _check(bank, x, ids, weights, dtype, block_m=24, decode_max_tokens=0)
    with pytest.raises(ValueError, match="block_k"):
        _check(bank, x, ids, weights, dtype, block_k=12)


def _timing(kernel, slots, block_m, tile, ms, gen="sm90", cls="16bit"):
    return tc.Timing(kernel, gen, cls, slots, block_m, tc.Tile(*tile), ms)


def test_the_tuner_picks_the_fastest_pair_sharing_block_m():
    timings = [
        # 1 slot per expert: GEMM1 is fastest at 16 rows, but GEMM2 at 32 more than makes up for it
        _timing("gemm1", 1, 16, (64, 64, 4, 3), 1.0), _timing("gemm1", 1, 32, (64, 64, 4, 3), 1.5),
        _timing("gemm1", 1, 32, (128, 64, 4, 3), 1.2),
        _timing("gemm2", 1, 16, (128, 64, 4, 3), 5.0), _timing("gemm2", 1, 32, (128, 64, 4, 4), 2.0),
        # 64 slots per expert: 64 rows
        _timing("gemm1", 64, 64, (64, 64, 8, 4), 3.0), _timing("gemm1", 64, 32, (64, 64, 4, 3), 4.0),
        _timing("gemm2", 64, 64, (256, 64, 8, 4), 3.0), _timing("gemm2", 64, 32, (128, 64, 4, 3), 3.5),
        # decode: the least total over the token counts measured
        _timing("gemv1", 1, 0, (16, 256, 4, 3), 1.0), _timing("gemv1", 2, 0, (16, 256, 4, 3), 3.0),
        _timing("gemv1", 1, 0, (32, 128, 4, 3), 1.5), _timing("gemv1", 2, 0, (32, 128, 4, 3), 2.0),
        _timing("int4_linear", 1, 16, (32, 128, 4, 3), 1.0, cls="int4"),
        _timing("int4_linear", 256, 64, (64, 64, 4, 3), 1.0, cls="int4"),
    ]
    tables = tc.choose_tables(timings)
    assert tables["sorted"][("sm90", "16bit")] == (
        (8.0, tc.SortedConfig(32, tc.Tile(128, 64, 4, 3), tc.Tile(128, 64, 4, 4))),
        (None, tc.SortedConfig(64, tc.Tile(64, 64, 8, 4), tc.Tile(256, 64, 8, 4))))
    assert tables["decode"][("sm90", "16bit")].gemv1 == tc.Tile(32, 128, 4, 3)
    assert tables["decode"][("sm90", "16bit")].gemv2 == tc.DECODE[("sm90", "16bit")].gemv2  # not measured: kept
    assert tables["linear"][("sm90", "int4")] == ((16.0, tc.LinearConfig(16, tc.Tile(32, 128, 4, 3))),
                                                  (None, tc.LinearConfig(64, tc.Tile(64, 64, 4, 3))))
    assert tables["sorted"][("sm80", "16bit")] == tc.SORTED[("sm80", "16bit")]  # other generations untouched


def test_a_written_table_is_what_the_launcher_reads(tmp_path, monkeypatch):
    path = str(tmp_path / "configs.json")
    timings = [_timing("gemm1", 3, 32, (16, 16, 4, 2), 1.0, cls="fp32"),
               _timing("gemm2", 3, 32, (32, 16, 4, 2), 1.0, cls="fp32")]
    data = tc.write_table(timings, path, meta={"device": "test"})
    assert data["sorted"]["sm90/fp32"] == [[None, 32, [16, 16, 4, 2], [32, 16, 4, 2]]]
    monkeypatch.setenv(tc.ENV_CONFIGS, path)
    cfg = tc.pick_sorted(None, "float32", False, 1000, 2, 4)
    assert cfg == tc.SortedConfig(32, tc.Tile(16, 16, 4, 2), tc.Tile(32, 16, 4, 2))
    assert tc.pick_sorted((8, 0), "float32", False, 1000, 2, 4) == tc.SORTED[("sm80", "fp32")][-1][1]
    bank, x, ids, weights = _case(9, experts=4, k=2, hidden=32, inter=48, dtype=torch.float32, seed=4)
    _check(bank, x, ids, weights, torch.float32, decode_max_tokens=0)  # runs the tuned entry
    with open(path, "w") as f:
        f.write('{"sorted": {"sm90/fp32": [[null, 24, [16, 16, 4, 2], [32, 16, 4, 2]]]}}')
    with pytest.raises(ValueError, match=r"QWEN2_MOE_HF_TRITON_CONFIGS=.*block_m 24"):
        tc.pick_sorted(None, "float32", False, 1000, 2, 4)


def test_the_tuner_launches_each_kernel_like_routed_experts():
    """kernel_launchers (what gpu_suite.py --tune times) runs the same kernels: fed GEMM1's activations, its GEMM2
    and combine give routed_experts' result bit for bit (sorted and decode path)."""
    dtype = torch.float32
    bank, x, ids, weights = _case(6, experts=4, k=2, hidden=64, inter=32, dtype=dtype, seed=9)
    tables = triton_moe.expert_tables([e.gate_proj.weight for e in bank], [e.up_proj.weight for e in bank],
                                      [e.down_proj.weight for e in bank], int4=False)
    tile = tc.Tile(32, 32, 4, 2)
    for first, second, config, decode_max in (("gemm1", "gemm2", tc.SortedConfig(16, tile, tile), 0),
                                               ("gemv1", "gemv2", tc.DecodeConfig(tile, tile), 64)):
        launch = triton_moe.kernel_launchers(x, ids, weights, tables, block_m=16)
        buffers = launch["buffers"]
        launch[first](tile)
        buffers["act_in"].copy_(buffers["act_out"])
        launch[second](tile)
        launch["combine"](tc.COMBINE)
        want = triton_moe.routed_experts(x, ids, weights, tables, decode_max_tokens=decode_max, config=config)
        assert torch.equal(buffers["out"], want), first

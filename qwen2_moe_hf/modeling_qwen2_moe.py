"""Qwen1.5-MoE (model_type `qwen2_moe`), self-contained: it never imports transformers' own qwen2_moe, so it runs on
transformers 4.38 (which has none) and replaces the built-in one on 5.x.

Top to bottom: RMSNorm, RoPE, attention (q/k/v bias, GQA; sdpa, eager, flash-attention-2), the dense MLP, the sparse
MoE block (router -> top-k (moe/routing.py) -> routed experts on the backend resolved for the layer (moe/backends/)
-> + sigmoid-gated shared expert), the decoder layer, the model, the load-balancing loss, and the heads. Parameter names are the hub's, so checkpoints load as they are.
"""

import logging
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import (
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)

from . import compat
from .configuration_qwen2_moe import Qwen2MoeConfig
from .loading import checkpoint_layout
from .loading import from_pretrained as load_checkpoint
from .moe import (DecodeLinear, ExpertWeights, decode_attention, fused_projections, prepare, requested_backend,
                  rms_norm, rope, route)
from .moe import decode_layer
from .moe.dense import mask_fits
from .moe import resolve as resolve_backend
from .moe import select as select_backend

logger = logging.getLogger("qwen2_moe_hf")


class Qwen2MoeRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        fused = rms_norm(hidden_states, self.weight, self.variance_epsilon)  # CPU inference: the same math, one op
        if fused is not None:
            return fused
        # Normalise in float32, scale in the model dtype: the released model's numerics.
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class Qwen2MoeRotaryEmbedding(nn.Module):
    """cos/sin of RoPE for given positions, with the config's rope_type (`rope_parameters` or `rope_scaling`):
    default, and every scaling the installed transformers defines (5.x: its own init functions; 4.38: linear and
    dynamic). The frequencies are recomputed per call (head_dim/2 numbers), so there is no buffer to get lost when
    models are built on the meta device.

    For the rope types whose frequencies do not depend on the positions (default, linear), cos/sin are also kept as
    a table over positions [0, n), made by the same ops on all of them at once (the same numbers), and looked up
    while the config, dtype and device are the ones it was made for. Why: a decode step computed them with a dozen
    small ops, ~0.16 ms a step with caches cold (docs/benchmarks.md). It is not module state: not in state_dict,
    made again after `.to()` or a config change."""

    TABLE_TYPES = ("default", "linear")
    TABLE_MAX = 1 << 15  # positions; past it, computed per call (a 32k table of bf16 cos + sin is 16 MiB)

    def __init__(self, config: Qwen2MoeConfig) -> None:
        super().__init__()
        self.config = config  # read on every call: a rope_parameters change takes effect at once

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        rope = self.config.rope_parameters
        if (rope.get("rope_type", "default") in self.TABLE_TYPES and position_ids.dtype == torch.long
                and x.device.type != "meta" and position_ids.device == x.device
                and not torch.compiler.is_compiling()):
            key = (rope.get("rope_type", "default"), rope.get("rope_theta"), rope.get("factor"),
                   self.config.head_dim, x.dtype, x.device)
            table = self.__dict__.get("_table")
            if table is not None and table[0] == key:
                # Positions outside the table (past it, negative) raise: then it is made again, or not used. Past
                # TABLE_MAX every call pays this try and a min / max (~30 us): small beside its attention over
                # more than 32k cached positions.
                try:
                    return F.embedding(position_ids, table[1]), F.embedding(position_ids, table[2])
                except IndexError:
                    pass
            if position_ids.numel() and int(position_ids.min()) >= 0:
                n = max(256, 1 << int(position_ids.max()).bit_length())
                if n <= self.TABLE_MAX:
                    cos, sin = self._cos_sin(x, torch.arange(n, device=x.device)[None])
                    self.__dict__["_table"] = (key, cos[0], sin[0])
                    return F.embedding(position_ids, cos[0]), F.embedding(position_ids, sin[0])
        return self._cos_sin(x, position_ids)

    def _cos_sin(self, x: torch.Tensor, position_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        inv_freq, scaling = compat.rope_frequencies(self.config, position_ids, x.device)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if scaling != 1.0:  # yarn, longrope: attention temperature folded into cos/sin, as transformers does
            cos, sin = cos * scaling, sin * scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """q, k [batch, heads, seq, head_dim]; cos, sin [batch, seq, head_dim]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[batch, kv_heads, seq, head_dim] -> [batch, kv_heads * n_rep, seq, head_dim] (GQA)."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, seq, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, seq, head_dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, seq, head_dim)


def check_attention_mask(attention_mask: Optional[torch.Tensor], batch: int, kv_len: int) -> None:
    """A padding mask [batch, past + new tokens], or an error naming it (not a broadcast deep in attention)."""
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape != (batch, kv_len)):
        raise ValueError(f"attention_mask: expected shape [batch={batch}, past + new tokens={kv_len}], "
                         f"got {list(attention_mask.shape)}")


def build_attention_mask(attention_mask: Optional[torch.Tensor], batch: int, q_len: int, past_len: int,
                         device: torch.device, sliding_window: Optional[int] = None) -> Optional[torch.Tensor]:
    """Boolean mask [batch, 1, q_len, kv_len] (True = may attend), or None when plain causal attention suffices.

    attention_mask: None or [batch, past_len + q_len] with 1 for real tokens, 0 for padding (left or right).
    Rows that may attend to nothing (queries at padding) attend to everything instead, so they stay finite and
    never spread NaN through the values of later layers; their outputs are meaningless and unused.
    """
    kv_len = past_len + q_len
    if attention_mask is not None:
        check_attention_mask(attention_mask, batch, kv_len)
        if bool(attention_mask.all()):
            attention_mask = None
    if attention_mask is None and sliding_window is None and (q_len == 1 or past_len == 0):
        return None
    q_pos = torch.arange(past_len, kv_len, device=device)[:, None]
    kv_pos = torch.arange(kv_len, device=device)[None, :]
    mask = kv_pos <= q_pos
    if sliding_window is not None:
        mask = mask & (kv_pos > q_pos - sliding_window)
    mask = mask[None, None].expand(batch, 1, q_len, kv_len)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :].bool()
    return mask | ~mask.any(dim=-1, keepdim=True)


def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], scaling: float, dropout: float = 0.0,
                            **kwargs: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scaling + mask) v, in the attention registry's calling convention: q [b, heads, q, d], k/v
    [b, kv_heads, kv, d] -> ([b, q, heads, d], weights [b, heads, q, kv]). The mask is boolean (True = may attend)
    or additive (transformers 5.x's eager format); without one, causal over the last q positions of kv."""
    key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None:
        attention_mask = attention_mask[..., :kv_len]
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    elif q_len > 1:
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).tril(kv_len - q_len)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2), weights


def sdpa_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: Optional[torch.Tensor], scaling: float, dropout: float = 0.0,
                           **kwargs: Any) -> Tuple[torch.Tensor, None]:
    """torch's scaled_dot_product_attention; transformers 4.x only (5.x's registry has its own)."""
    key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, is_causal=attention_mask is None and query.shape[2] > 1)
    return out.transpose(1, 2), None


def flash_attention_2_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: Optional[torch.Tensor], scaling: float, dropout: float = 0.0,
                              **kwargs: Any) -> Tuple[torch.Tensor, None]:
    """flash-attn's kernel; transformers 4.x only. With padding (a mask) it cannot mask: sdpa instead."""
    if attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling, dropout)
    from flash_attn import flash_attn_func

    # flash-attn wants [batch, seq, heads, dim]; its causal mask is bottom-right aligned, as a cache needs.
    out = flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dropout_p=dropout,
                          softmax_scale=scaling, causal=query.shape[2] > 1)
    return out, None


# transformers 4.x has no attention registry: ours, by config._attn_implementation. On 5.x its registry
# (ALL_ATTENTION_FUNCTIONS: sdpa, flash, flex, paged, and whatever users register) serves instead.
_OWN_ATTENTION = {"eager": eager_attention_forward, "sdpa": sdpa_attention_forward,
                  "flash_attention_2": flash_attention_2_forward}


class Qwen2MoeAttention(nn.Module):
    """Multi-head attention with q/k/v bias, grouped-query KV heads and RoPE; the attention itself is the function
    `config._attn_implementation` names (transformers 5.x's registry, or ours on 4.x), eager when attention
    weights are asked for."""

    def __init__(self, config: Qwen2MoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        self.q_proj = DecodeLinear(config.hidden_size, self.num_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = DecodeLinear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = DecodeLinear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = DecodeLinear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: Tuple[torch.Tensor, torch.Tensor],
                attention_mask: Optional[torch.Tensor] = None, past_key_values: Optional[compat.Cache] = None,
                output_attentions: bool = False, **kwargs: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        batch, q_len, _ = hidden_states.shape
        # GPTQ-Int4 on CPU: the three projections in one op call; otherwise each module.
        projected = fused_projections(hidden_states, (self.q_proj, self.k_proj, self.v_proj))
        if projected is None:
            projected = [self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)]
        query, key, value = (p.view(batch, q_len, -1, self.head_dim).transpose(1, 2) for p in projected)
        cos, sin = position_embeddings
        fused = rope(query, key, cos, sin)  # CPU inference: the same math in one op
        query, key = fused if fused is not None else apply_rotary_pos_emb(query, key, cos, sin)
        if past_key_values is not None:
            if not torch.compiler.is_compiling():
                compat.append_kv_in_place(past_key_values, self.layer_idx, key)  # CPU: no whole-cache copy per step
            key, value = past_key_values.update(key, value, self.layer_idx)

        implementation = "eager" if output_attentions else (
            getattr(self.config, "_attn_implementation", None) or "sdpa")
        dropout = self.attention_dropout if self.training else 0.0
        # sdpa's decode steps on CPU: the same function in one op (torch's flash kernel is 7-9x slower for one query)
        out = decode_attention(query, key, value, attention_mask, self.scaling, dropout, self.sliding_window,
                               **kwargs) if implementation == "sdpa" else None
        weights = None
        if out is None:
            if compat.ALL_ATTENTION_FUNCTIONS is not None and implementation != "eager":  # 5.x: its registry
                attention = compat.ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
            else:  # 4.x (or eager): ours; an unknown name runs eager, as 4.x's models fall back
                attention = _OWN_ATTENTION.get(implementation, eager_attention_forward)
            out, weights = attention(self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling,
                                     sliding_window=self.sliding_window, **kwargs)
        out = self.o_proj(out.reshape(batch, q_len, -1).contiguous())
        return out, weights


class Qwen2MoeMLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x)). Dense layers, each routed expert and the shared expert."""

    def __init__(self, config: Qwen2MoeConfig, intermediate_size: Optional[int] = None) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size if intermediate_size is None else intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _drop_prepared_weights(experts: nn.Module, incompatible_keys: Any = None) -> None:
    experts.__dict__.setdefault("_prepared", {}).clear()


class Qwen2MoeExperts(nn.ModuleList):
    """The routed experts, one Qwen2MoeMLP each, so the state dict speaks the hub's `experts.{e}.{gate,up,down}_proj`
    names and PEFT can wrap any projection.

    forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H], the weighted sum of each
    token's top-k experts, computed by the backend resolved for this layer (moe/backends/) on the experts' prepared
    weights (moe/weights.py). Those are gathered once from the modules and kept until something they read is
    replaced (checked on every call) or `_apply` / `load_state_dict` drop them."""

    def __init__(self, config: Qwen2MoeConfig) -> None:
        super().__init__([Qwen2MoeMLP(config, config.moe_intermediate_size) for _ in range(config.num_experts)])
        self.config = config
        self.__dict__["_prepared"] = {}
        self.register_load_state_dict_post_hook(_drop_prepared_weights)

    def prepared_weights(self, shared_expert: Optional[nn.Module] = None) -> ExpertWeights:
        """The routed experts' weights (with `shared_expert`'s, for a fused lane) as the backends read them: built
        once, and again only when a module or tensor it read has been replaced."""
        cache = self.__dict__.setdefault("_prepared", {})
        key = None if shared_expert is None else id(shared_expert)
        weights = cache.get(key)
        if weights is None or weights.shared_module is not shared_expert or not weights.current():
            weights = cache[key] = prepare(self, shared_expert, self.config.hidden_act)
        return weights

    def _apply(self, fn, *args, **kwargs):
        _drop_prepared_weights(self)  # new tensors (.to(), .half(), .cuda()): prepare again
        return super()._apply(fn, *args, **kwargs)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        weights = self.prepared_weights()
        chosen = select_backend(requested_backend(getattr(self.config, "moe_backend", None)), weights, hidden_states)
        return chosen.experts(hidden_states, top_k_index, top_k_weights, weights)


class Qwen2MoeSparseMoeBlock(nn.Module):
    """router -> top-k routed experts (weighted) + sigmoid(shared_expert_gate(x)) * shared_expert(x).

    forward(hidden_states [batch, seq, hidden]) -> [batch, seq, hidden]; with return_router_logits=True also the
    router logits [batch * seq, num_experts]. Without autograd, a backend with a fused lane (the cpu one) may compute
    the whole block in one call; it computes exactly the lines below.
    """

    def __init__(self, config: Qwen2MoeConfig) -> None:
        super().__init__()
        validate_config(config)
        self.config = config
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Qwen2MoeExperts(config)
        self.shared_expert = Qwen2MoeMLP(config, intermediate_size=config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, hidden_states: torch.Tensor,
                return_router_logits: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        fused = fused_layer(self, x, requested_backend(getattr(self.config, "moe_backend", None)))
        if fused is not None:
            out, router_logits = fused
        else:
            router_logits = self.gate(x)
            top_k_weights, top_k_index = route(router_logits, self.top_k, self.norm_topk_prob)
            out = self.experts(x, top_k_index, top_k_weights)
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        out = out.reshape(hidden_states.shape)
        return (out, router_logits) if return_router_logits else out


def fused_layer(block: "Qwen2MoeSparseMoeBlock", x: torch.Tensor,
                requested: str) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(out, router_logits) from the fused lane of the backend resolved for this block, or None: when autograd is
    on, when that backend has none, or when it declines this call."""
    if torch.is_grad_enabled():
        return None
    weights = block.experts.prepared_weights(block.shared_expert)
    chosen = resolve_backend(requested, weights, x.device, x.dtype)
    if chosen.fused_layer is None:
        return None
    return chosen.fused_layer(block, x, weights)


def clamp_fp16(hidden_states: torch.Tensor) -> torch.Tensor:
    """In float16, residual-stream values past its range become inf and then NaN in the next norm; clamp them to
    just inside the range instead (as transformers' T5 does). Elementwise, no host sync; other dtypes pass."""
    if hidden_states.dtype == torch.float16:
        limit = torch.finfo(torch.float16).max - 1000
        hidden_states = hidden_states.clamp(-limit, limit)
    return hidden_states


def _drop_decode_plan(layer: nn.Module, incompatible_keys: Any = None) -> None:
    decode_layer.drop(layer)


# The modules a decode layer's one-call CPU step stands in for (moe/decode_layer.py).
_DECODE_KINDS = decode_layer.DecodeKinds(attention=Qwen2MoeAttention, moe=Qwen2MoeSparseMoeBlock,
                                         norm=Qwen2MoeRMSNorm)


class Qwen2MoeDecoderLayer(compat.GradientCheckpointingLayer):
    """attention and MoE (or dense MLP) blocks, each pre-normed with a residual. On transformers 5.x it is a
    GradientCheckpointingLayer: with gradient checkpointing on and in training, it checkpoints its own forward and
    drops the cache it was handed (hidden_states must come positionally, the cache by keyword)."""

    def __init__(self, config: Qwen2MoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Qwen2MoeAttention(config, layer_idx)
        if config.is_moe_layer(layer_idx):
            self.mlp = Qwen2MoeSparseMoeBlock(config)
        else:
            self.mlp = Qwen2MoeMLP(config, intermediate_size=config.intermediate_size)
        self.input_layernorm = Qwen2MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.register_load_state_dict_post_hook(_drop_decode_plan)

    def _apply(self, fn, *args, **kwargs):
        _drop_decode_plan(self)  # tensors converted in place (.to(), .half()): plan the decode steps again
        return super()._apply(fn, *args, **kwargs)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Tuple[torch.Tensor, torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[compat.Cache] = None,
        output_attentions: bool = False,
        **attention_kwargs: Any,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """-> (hidden_states, attention weights or None, router logits or None). attention_kwargs reach the
        attention function (5.x: e.g. a paged cache and sequence offsets from continuous batching)."""
        if not output_attentions and not torch.is_grad_enabled():
            fused = self._decode_step(hidden_states, position_embeddings, attention_mask, past_key_values,
                                      attention_kwargs)
            if fused is not None:
                return fused[0], None, fused[1]
        residual = hidden_states
        hidden_states, attn_weights = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, past_key_values,
            output_attentions, **attention_kwargs,
        )
        hidden_states = clamp_fp16(residual + hidden_states)
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        router_logits = None
        if isinstance(self.mlp, Qwen2MoeSparseMoeBlock):
            hidden_states, router_logits = self.mlp(hidden_states, return_router_logits=True)
        else:
            hidden_states = self.mlp(hidden_states)
        return clamp_fp16(residual + hidden_states), attn_weights, router_logits

    def _decode_step(self, hidden_states: torch.Tensor, position_embeddings: Tuple[torch.Tensor, torch.Tensor],
                     attention_mask: Optional[torch.Tensor], past_key_values: Optional[compat.Cache],
                     attention_kwargs: Dict[str, Any]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """CPU decode of one sequence: the forward above in one call to the CPU ops (moe/decode_layer.py: the same
        ops, in the same order, bit for bit), with the new position written into the cache's buffers in place;
        None where anything differs from that case (then the modules run)."""
        step = self._decode_call(hidden_states, position_embeddings, attention_mask, past_key_values, attention_kwargs)
        if step is None:
            return None
        out = decode_layer.run_steps([step], hidden_states)
        return out, step.router_logits

    def _decode_call(self, hidden_states: torch.Tensor, position_embeddings: Tuple[torch.Tensor, torch.Tensor],
                     attention_mask: Optional[torch.Tensor], past_key_values: Optional[compat.Cache],
                     attention_kwargs: Dict[str, Any]) -> Optional[decode_layer.DecodeStep]:
        """This call's decode step where it can take the lane (its cache layer, its plan's arguments, its mask), else
        None. Nothing is changed yet: decode_layer.run_steps writes the cache."""
        cache_layer = compat.decode_kv_layer(past_key_values, self.self_attn.layer_idx)
        if cache_layer is None:
            return None
        call = decode_layer.prepare(self, hidden_states, position_embeddings, attention_kwargs, _DECODE_KINDS)
        if call is None:
            return None
        held = cache_layer.keys.shape[-2] if cache_layer.keys.dim() == 4 else 0
        if not mask_fits(attention_mask, held + 1):
            return None
        return decode_layer.DecodeStep(call, cache_layer, attention_mask)


def validate_config(config: Qwen2MoeConfig) -> None:
    """Every field of the config, as the model is built from it: attributes changed by hand since the config was
    made (or set by from_pretrained's keyword arguments) are checked here too. A moe_backend must be a known name."""
    config.validate()
    if getattr(config, "moe_backend", None) is not None:
        requested_backend(config.moe_backend)


class Qwen2MoePreTrainedModel(PreTrainedModel):
    config_class = Qwen2MoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2MoeDecoderLayer"]
    _skip_keys_device_placement = "past_key_values"
    _supports_sdpa = True
    _supports_flash_attn_2 = True  # transformers 4.x
    _supports_flash_attn = True  # transformers 5.x
    _supports_flex_attn = True  # 5.x, through its attention registry
    _supports_attention_backend = True  # 5.x: attention is whatever function the registry holds
    _supports_cache_class = True

    def __init__(self, config: Qwen2MoeConfig, *inputs: Any, **kwargs: Any) -> None:
        if isinstance(config, Qwen2MoeConfig):
            validate_config(config)
        super().__init__(config, *inputs, **kwargs)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any
    ) -> Union["Qwen2MoePreTrainedModel", Tuple["Qwen2MoePreTrainedModel", Dict[str, Any]]]:
        """transformers' from_pretrained within our load plan (loading/plan.py): GPTQ checkpoints load through our
        int4 layers and loader whatever GPTQ libraries are installed (their quantizers would drop or mis-wrap the
        per-expert int4 tensors); full-precision ones through transformers' loader with our checks (shards checked
        first, named errors, only safetensors unless use_safetensors=False, and a tensor the model needs but the
        checkpoint lacks raises instead of being initialised at random: allow_missing_weights=True restores
        transformers' warning)."""
        load = super().from_pretrained.__func__
        return load_checkpoint(cls, lambda *a, **k: load(cls, *a, **k), pretrained_model_name_or_path, model_args,
                               kwargs)

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' save_pretrained, with the int4 weights a CPU load blocked for its kernels put back in the
        checkpoint layout within their own storage while it runs (gptq/linear.py's checkpoint_layout): the files
        hold the checkpoint's layout, and saving takes no second copy of the int4 weights."""
        with checkpoint_layout(self):
            return super().save_pretrained(*args, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return getattr(self, self.base_model_prefix, self).embed_tokens  # a head's is its base model's

    def set_input_embeddings(self, value: nn.Module) -> None:
        getattr(self, self.base_model_prefix, self).embed_tokens = value

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            compat.init_normal_(module.weight, std)
            if module.bias is not None:
                compat.init_zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            compat.init_normal_(module.weight, std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, Qwen2MoeRMSNorm):
            compat.init_ones_(module.weight)


def check_inputs(input_ids: Optional[torch.Tensor], inputs_embeds: Optional[torch.Tensor],
                 position_ids: Optional[torch.Tensor], hidden_size: int) -> None:
    """Shapes and dtypes of the model's inputs, each error naming the argument (instead of an unpacking or index
    error deep inside, or a silently broadcast position)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Give exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids: expected integer token ids of shape [batch, sequence], got "
                             f"{input_ids.dtype} of shape {list(input_ids.shape)} (a single sequence is [1, length])")
        shape, name = tuple(input_ids.shape), "input_ids"
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden_size:
            raise ValueError(f"inputs_embeds: expected shape [batch, sequence, hidden_size={hidden_size}], got "
                             f"{list(inputs_embeds.shape)}")
        shape, name = tuple(inputs_embeds.shape[:2]), "inputs_embeds"
    if shape[0] == 0:
        raise ValueError(f"{name}: empty batch (shape {list(shape)}); give at least one sequence")
    if shape[1] == 0:
        raise ValueError(f"{name}: empty sequence (shape {list(shape)}); give at least one token")
    if position_ids is not None and (
            position_ids.dim() != 2 or position_ids.shape[0] not in (1, shape[0]) or position_ids.shape[1] != shape[1]
            or position_ids.dtype.is_floating_point):
        raise ValueError(f"position_ids: expected integer positions of shape [batch={shape[0]} (or 1), "
                         f"sequence={shape[1]}], got {position_ids.dtype} of shape {list(position_ids.shape)}")


def check_labels(labels: torch.Tensor, shape: Sequence[int], num_classes: int, what: str = "the vocabulary",
                 ignore_index: int = -100) -> None:
    """Class ids outside [0, num_classes) (other than ignore_index) raise naming the first one, instead of an index
    error on CPU or a device-side assert on GPU (one host sync; training only)."""
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"labels: expected shape {list(shape)}, got {list(labels.shape)}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        position = bad.nonzero()[0].tolist()
        raise ValueError(f"labels: {int(labels[tuple(position)])} at position {position} is outside {what} "
                         f"[0, {num_classes}) (and is not the ignored {ignore_index})")


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Token ids outside [0, vocab_size) raise here, naming the id, instead of an index error on CPU or a
    device-side assert on GPU (which leaves the CUDA context unusable). Costs one host sync per forward on GPU."""
    bad = (input_ids < 0) | (input_ids >= vocab_size)
    if bad.any():
        position = bad.nonzero()[0].tolist()
        raise ValueError(f"input_ids: token id {int(input_ids[tuple(position)])} at position {position} is outside "
                         f"the vocabulary [0, {vocab_size}) (config.vocab_size {vocab_size})")


class Qwen2MoeModel(Qwen2MoePreTrainedModel):
    def __init__(self, config: Qwen2MoeConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([Qwen2MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Qwen2MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2MoeRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """embed_tokens(input_ids), ids outside the vocabulary refused by check_input_ids. On CPU a plain Embedding's
        lookup refuses them itself (IndexError), so the check runs only then, to name the id: its four ops cost ~45
        us of a decode step with caches cold. Elsewhere it runs first (a GPU's lookup would assert on the device)."""
        embed = self.embed_tokens
        if type(embed) is nn.Embedding and embed.max_norm is None and embed.weight.is_cpu and input_ids.is_cpu:
            try:
                return embed(input_ids)
            except IndexError as error:  # raised outside the handler: the ValueError is not "during handling"
                failed = error
            check_input_ids(input_ids, embed.num_embeddings)
            raise failed
        check_input_ids(input_ids, embed.num_embeddings)
        return embed(input_ids)

    def _decode_layers(self, hidden_states: torch.Tensor, position_embeddings: Tuple[torch.Tensor, torch.Tensor],
                       masks: Dict[str, Any], past_key_values: Optional[compat.Cache], attention_kwargs: Dict[str, Any]
                       ) -> Optional[Tuple[torch.Tensor, list, bool]]:
        """A CPU decode step of every layer in one call to the extension: (hidden states after the last layer,
        each layer's router logits, whether the final norm is applied to them), what calling each layer in turn
        (and then the norm) gives bit for bit (each takes its lane, Qwen2MoeDecoderLayer._decode_step), or None
        where any layer would not (then the loop calls the layers, and nothing has changed). Why: each layer's own
        call from Python (its checks, its cache's bookkeeping) ran between the layers' weight streams with caches
        cold, ~0.2 ms a layer at the real shape; here they run back to back before the extension's loop, and the
        final norm's call (~0.13 ms cold) is in it (docs/benchmarks.md)."""
        steps = []
        for layer, kind in zip(self.layers, self.config.layer_types):
            if not decode_layer.calls_forward(layer, Qwen2MoeDecoderLayer):
                return None
            step = layer._decode_call(hidden_states, position_embeddings, masks[kind], past_key_values,
                                      attention_kwargs)
            if step is None:
                return None
            steps.append(step)
        if not steps:
            return None
        norm = decode_layer.final_norm(self.norm, Qwen2MoeRMSNorm, hidden_states)
        out = decode_layer.run_steps(steps, hidden_states, norm)
        return out, [step.router_logits for step in steps], norm is not None

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Union[compat.Cache, Sequence[Tuple[torch.Tensor, torch.Tensor]]]] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        output_router_logits: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        cache_position: Optional[torch.LongTensor] = None,
        **kwargs: Any,
    ) -> Union[Tuple, MoeModelOutputWithPast]:
        config = self.config
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        )
        output_router_logits = (
            output_router_logits if output_router_logits is not None else config.output_router_logits
        )
        use_cache = use_cache if use_cache is not None else config.use_cache
        return_dict = return_dict if return_dict is not None else getattr(config, "return_dict", True)

        check_inputs(input_ids, inputs_embeds, position_ids, config.hidden_size)
        if self.gradient_checkpointing and self.training and use_cache:
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing; using use_cache=False")
            use_cache = False
        if inputs_embeds is None:
            inputs_embeds = self._embed(input_ids)
        batch, q_len = inputs_embeds.shape[:2]

        past_key_values = compat.as_cache(past_key_values)
        if use_cache and past_key_values is None:
            past_key_values = compat.DynamicCache()
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past_len + q_len > config.max_position_embeddings:
            logger.warning_once(
                f"sequence length {past_len + q_len} exceeds config.max_position_embeddings "
                f"({config.max_position_embeddings}): RoPE extrapolates beyond what the model was trained on, and "
                "quality may degrade"
            )
        if cache_position is None:
            cache_position = torch.arange(past_len, past_len + q_len, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0).expand(batch, -1)

        if isinstance(attention_mask, dict):  # {layer type: mask}, already prepared (transformers 5.x's generate)
            masks = attention_mask
        elif compat.IS_V5 and attention_mask is not None and attention_mask.dim() == 4:
            # already in the attention function's form (5.x's continuous batching): every layer type uses it
            masks = {kind: attention_mask for kind in set(config.layer_types)}
        else:
            check_attention_mask(attention_mask, batch, past_len + q_len)
            masks = compat.attention_masks(config, inputs_embeds, attention_mask, past_key_values, position_ids)
        if masks is None:  # transformers 4.x: our boolean masks, for our attention functions
            masks = {
                kind: build_attention_mask(
                    attention_mask, batch, q_len, past_len, inputs_embeds.device,
                    sliding_window=config.sliding_window if kind == "sliding_attention" else None,
                )
                for kind in set(config.layer_types)
            }
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        all_router_logits = () if output_router_logits else None
        fused, normed = None, False
        if not (output_hidden_states or output_attentions or torch.is_grad_enabled()):
            fused = self._decode_layers(hidden_states, position_embeddings, masks, past_key_values, kwargs)
        if fused is not None:
            hidden_states, router_logits, normed = fused
            if output_router_logits:
                all_router_logits += tuple(router_logits)
        for layer, kind in zip(self.layers if fused is None else (), config.layer_types):
            mask = masks[kind]
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if self.gradient_checkpointing and self.training and not compat.HAS_CHECKPOINTING_LAYER:
                hidden_states, attn, router_logits = self._gradient_checkpointing_func(
                    layer.__call__, hidden_states, position_embeddings, mask, None, output_attentions
                )
            else:  # on 5.x the layer checkpoints itself when asked to
                hidden_states, attn, router_logits = layer(
                    hidden_states, position_embeddings, mask, past_key_values=past_key_values,
                    output_attentions=output_attentions, **kwargs,
                )
            if output_attentions:
                all_attentions += (attn,)
            if output_router_logits and router_logits is not None:
                all_router_logits += (router_logits,)
        if not normed:
            hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        output = compat.model_output(
            MoeModelOutputWithPast,
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            router_logits=all_router_logits,
        )
        return output if return_dict else output.to_tuple()


def load_balancing_loss_func(router_logits: Optional[Sequence[torch.Tensor]], num_experts: int, top_k: int,
                             attention_mask: Optional[torch.Tensor] = None) -> Union[torch.Tensor, int]:
    """Switch-Transformer load-balancing loss over the MoE layers' router logits (each [batch * seq, E]):
    num_experts * sum_e (fraction of top-k slots routed to e) * (mean router probability of e), over real tokens.
    """
    if not router_logits:
        return 0
    device = router_logits[0].device
    logits = torch.cat([layer.to(device) for layer in router_logits], dim=0)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    _, selected = torch.topk(probs, top_k, dim=-1)
    slots = F.one_hot(selected, num_experts).to(torch.float32)  # [rows, k, E]
    if attention_mask is None:
        tokens_per_expert = slots.sum(dim=(0, 1)) / probs.shape[0]
        prob_per_expert = probs.mean(dim=0)
    else:
        rows_per_layer = router_logits[0].shape[0]
        batch = attention_mask.shape[0]
        # With a cache the mask also covers past tokens; the logits are for the last seq positions only.
        mask = attention_mask[:, -(rows_per_layer // batch):].reshape(-1).to(device, torch.float32)
        mask = mask.repeat(len(router_logits))
        tokens_per_expert = (slots * mask[:, None, None]).sum(dim=(0, 1)) / mask.sum()
        prob_per_expert = (probs * mask[:, None]).sum(dim=0) / mask.sum()
    return num_experts * torch.sum(tokens_per_expert * prob_per_expert)


def _causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    shift_logits = logits[..., :-1, :].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[..., 1:].reshape(-1).to(shift_logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index)


class Qwen2MoeForCausalLM(Qwen2MoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} if compat.IS_V5 else ["lm_head.weight"]
    # transformers 5.x's tensor / pipeline parallel plans for the head (the base model's are the config's).
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: Qwen2MoeConfig) -> None:
        super().__init__(config)
        self.model = Qwen2MoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = DecodeLinear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    def get_decoder(self) -> Qwen2MoeModel:
        return self.model

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Union[compat.Cache, Sequence[Tuple[torch.Tensor, torch.Tensor]]]] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        output_router_logits: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        cache_position: Optional[torch.LongTensor] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        **kwargs: Any,
    ) -> Union[Tuple, MoeCausalLMOutputWithPast]:
        config = self.config
        output_router_logits = (
            output_router_logits if output_router_logits is not None else config.output_router_logits
        )
        return_dict = return_dict if return_dict is not None else getattr(config, "return_dict", True)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits,
            return_dict=True,
            cache_position=cache_position,
            **{k: v for k, v in kwargs.items() if k != "num_logits_to_keep"},
        )
        hidden_states = outputs.last_hidden_state
        logits_to_keep = kwargs.get("num_logits_to_keep", logits_to_keep)  # the 4.4x name
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            check_labels(labels, (hidden_states.shape[0], hidden_states.shape[1]), config.vocab_size)
            loss = _causal_lm_loss(logits, labels)
        aux_loss = None
        if output_router_logits:
            aux_loss = load_balancing_loss_func(
                outputs.router_logits, config.num_experts, config.num_experts_per_tok, attention_mask
            )
            if loss is not None and torch.is_tensor(aux_loss):
                loss = loss + config.router_aux_loss_coef * aux_loss.to(loss.device)

        output = compat.model_output(
            MoeCausalLMOutputWithPast,
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )
        return output if return_dict else output.to_tuple()

    if not compat.HAS_GENERIC_PREPARE_INPUTS:

        def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs: Any) -> Dict[str, Any]:
            return compat.prepare_inputs_for_generation(self, input_ids, **kwargs)

        @staticmethod
        def _reorder_cache(past_key_values, beam_idx):
            past_key_values.reorder_cache(beam_idx)
            return past_key_values

    elif compat.IS_V5:  # GenerationMixin's own, with a decode step's common case built in a few lines (compat)

        def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs: Any) -> Dict[str, Any]:
            inputs = compat.decode_step_inputs(self, input_ids, kwargs)
            return inputs if inputs is not None else super().prepare_inputs_for_generation(input_ids, **kwargs)

        def _update_model_kwargs_for_generation(self, outputs: Any, model_kwargs: Dict[str, Any],
                                                *args: Any, **kwargs: Any) -> Dict[str, Any]:
            updated = compat.next_step_kwargs(outputs, model_kwargs, *args, **kwargs)
            if updated is None:
                updated = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
            return updated


class Qwen2MoeForSequenceClassification(Qwen2MoePreTrainedModel):
    """Scores each sequence from the hidden state of its last non-padding token."""

    def __init__(self, config: Qwen2MoeConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = Qwen2MoeModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Union[compat.Cache, Sequence[Tuple[torch.Tensor, torch.Tensor]]]] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs: Any,
    ) -> Union[Tuple, SequenceClassifierOutputWithPast]:
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
        )
        logits = self.score(outputs.last_hidden_state)
        batch = logits.shape[0]
        if self.config.pad_token_id is None and batch != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")  # as transformers
        if input_ids is not None and self.config.pad_token_id is not None:
            # Rightmost non-pad token, which is correct for both left and right padding.
            non_pad = (input_ids != self.config.pad_token_id).int()
            positions = torch.arange(input_ids.shape[1], device=logits.device)
            last = (positions * non_pad.to(logits.device)).argmax(-1)
        else:
            last = torch.full((batch,), logits.shape[1] - 1, device=logits.device)
        pooled = logits[torch.arange(batch, device=logits.device), last]

        loss = None
        if labels is not None:
            labels = labels.to(pooled.device)
            if self.num_labels > 1 and labels.dtype in (torch.long, torch.int):
                check_labels(labels, (batch,), self.num_labels, what="the labels (num_labels)")
            if self.num_labels == 1:
                loss = F.mse_loss(pooled.squeeze(-1).float(), labels.float())
            elif labels.dtype in (torch.long, torch.int):
                loss = F.cross_entropy(pooled.float(), labels)
            else:
                loss = F.binary_cross_entropy_with_logits(pooled.float(), labels.float())
        output = SequenceClassifierOutputWithPast(
            loss=loss, logits=pooled, past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()


class Qwen2MoeForTokenClassification(Qwen2MoePreTrainedModel):
    """A label per token: dropout, then a linear `score` on each hidden state (transformers 5.x's generic token
    classifier: dropout `classifier_dropout`, else `hidden_dropout`, else 0.1; bias unless
    `token_classification_bias=False`)."""

    def __init__(self, config: Qwen2MoeConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = Qwen2MoeModel(config)
        dropout = getattr(config, "classifier_dropout", None)
        if dropout is None:
            dropout = getattr(config, "hidden_dropout", None)
        self.dropout = nn.Dropout(0.1 if dropout is None else dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels,
                               bias=getattr(config, "token_classification_bias", True))
        self.post_init()

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Union[compat.Cache, Sequence[Tuple[torch.Tensor, torch.Tensor]]]] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs: Any,
    ) -> Union[Tuple, TokenClassifierOutput]:
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
        )
        logits = self.score(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            check_labels(labels, logits.shape[:2], self.num_labels, what="the labels (num_labels)")
            loss = F.cross_entropy(logits.float().reshape(-1, self.num_labels), labels.reshape(-1).to(logits.device))
        output = TokenClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                       attentions=outputs.attentions)
        return output if return_dict else output.to_tuple()


class Qwen2MoeForQuestionAnswering(Qwen2MoePreTrainedModel):
    """Extractive QA: `qa_outputs` maps each hidden state to a start and an end logit. The loss is the mean of the
    start and end cross-entropies; positions outside the sequence are clamped to its length and ignored (as in
    transformers)."""

    def __init__(self, config: Qwen2MoeConfig) -> None:
        super().__init__(config)
        self.model = Qwen2MoeModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Union[compat.Cache, Sequence[Tuple[torch.Tensor, torch.Tensor]]]] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        start_positions: Optional[torch.LongTensor] = None,
        end_positions: Optional[torch.LongTensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs: Any,
    ) -> Union[Tuple, QuestionAnsweringModelOutput]:
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=False,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
        )
        start_logits, end_logits = self.qa_outputs(outputs.last_hidden_state).split(1, dim=-1)
        start_logits, end_logits = start_logits.squeeze(-1).contiguous(), end_logits.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.shape[1]
            losses = []
            for logits, positions, name in ((start_logits, start_positions, "start_positions"),
                                            (end_logits, end_positions, "end_positions")):
                positions = positions.reshape(-1) if positions.dim() > 1 else positions
                if positions.shape != (logits.shape[0],):
                    raise ValueError(f"{name}: expected shape [batch={logits.shape[0]}], got {list(positions.shape)}")
                positions = positions.to(logits.device).clamp(0, ignored)
                losses.append(F.cross_entropy(logits.float(), positions, ignore_index=ignored))
            loss = (losses[0] + losses[1]) / 2
        output = QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                              hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        return output if return_dict else output.to_tuple()


__all__ = [
    "Qwen2MoeForCausalLM",
    "Qwen2MoeForQuestionAnswering",
    "Qwen2MoeForSequenceClassification",
    "Qwen2MoeForTokenClassification",
    "Qwen2MoeModel",
    "Qwen2MoePreTrainedModel",
    "Qwen2MoeSparseMoeBlock",
    "load_balancing_loss_func",
]

"""Qwen2MoeConfig: the hub's qwen2_moe config.json, readable on transformers 4.38.2 and 5.x.

The hub files are in the 4.39 form (`rope_theta`, `torch_dtype`); transformers 5.x writes `rope_parameters`, `dtype`
and `layer_types`. Both load here, and what we save carries both `rope_theta` and `rope_parameters` so either stack
reads it back. Defaults are transformers' (Qwen1.5-MoE-A2.7B).
"""

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from transformers import PretrainedConfig

from . import compat
from .files import read_json_object

SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
# Every rope_type the installed transformers defines (5.x), or linear and dynamic (4.38): compat.ROPE_TYPES.
SUPPORTED_ROPE_TYPES = compat.ROPE_TYPES
LAYER_TYPES = ("full_attention", "sliding_attention")


def _bad(field, expected, got):
    return ValueError(f"Qwen2MoeConfig.{field}: expected {expected}, got {got!r}")


def _is_int(v):
    return type(v) is int  # not bool, not float


def _is_number(v):
    return type(v) in (int, float) and math.isfinite(v)


def _int_at_least(lo):
    return f"an integer >= {lo}", lambda v: _is_int(v) and v >= lo


def _token_ids(v):
    return v is None or _is_int(v) or isinstance(v, (list, tuple)) and all(_is_int(i) for i in v)


_BOOL = ("true or false", lambda v: type(v) is bool)
# Every field's type and range on its own (cross-field rules are in validate()): what a config.json, a keyword
# argument or an attribute set by hand must satisfy, on every route.
FIELD_RULES = {
    **{name: _int_at_least(1) for name in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "decoder_sparse_step")},
    **{name: _int_at_least(0) for name in (
        "num_experts", "moe_intermediate_size", "shared_expert_intermediate_size", "num_experts_per_tok",
        "max_window_layers")},
    **{name: _BOOL for name in ("use_cache", "tie_word_embeddings", "use_sliding_window", "norm_topk_prob",
                                "output_router_logits", "qkv_bias")},
    "rms_norm_eps": ("a finite number > 0", lambda v: _is_number(v) and v > 0),
    "initializer_range": ("a finite number >= 0", lambda v: _is_number(v) and v >= 0),
    "router_aux_loss_coef": ("a finite number >= 0", lambda v: _is_number(v) and v >= 0),
    "attention_dropout": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    "hidden_act": (f"one of {SUPPORTED_ACTIVATIONS}", lambda v: isinstance(v, str) and v in SUPPORTED_ACTIVATIONS),
    # 5.x's built-in config writes 0 when sliding attention is off; when it is on, validate() wants >= 1.
    "sliding_window": ("null or an integer >= 0", lambda v: v is None or _is_int(v) and v >= 0),
    "head_dim": ("an even integer >= 2 (or null: hidden_size // num_attention_heads)",
                 lambda v: _is_int(v) and v >= 2 and v % 2 == 0),
    "moe_backend": ("null or a backend name", lambda v: v is None or isinstance(v, str)),
    "mlp_only_layers": ("a list of layer indices", lambda v: isinstance(v, (list, tuple)) and all(map(_is_int, v))),
    "layer_types": (f"a list of {LAYER_TYPES}",
                    lambda v: isinstance(v, (list, tuple)) and all(t in LAYER_TYPES for t in v)),
    "pad_token_id": ("null or an integer", lambda v: v is None or _is_int(v)),
    "bos_token_id": ("null, an integer or a list of integers", _token_ids),
    "eos_token_id": ("null, an integer or a list of integers", _token_ids),
    "rope_theta": ("a finite number > 0", lambda v: _is_number(v) and v > 0),
}


_UNSET = object()
# None: computed from the others (num_key_value_heads: Qwen2 configs from before GQA leave it unset)
_DERIVED = ("head_dim", "layer_types", "rope_theta", "mlp_only_layers", "num_key_value_heads")


def check_field(name: str, value: Any) -> None:
    """Raise ValueError naming `name` when `value` is not of its type or range (FIELD_RULES)."""
    expected, ok = FIELD_RULES[name]
    if not ok(value):
        raise _bad(name, expected, value)


class Qwen2MoeConfig(PretrainedConfig):
    model_type = "qwen2_moe"
    keys_to_ignore_at_inference = ["past_key_values"]
    # Tensor parallelism on transformers 5.x (`from_pretrained(..., tp_plan="auto")` under torchrun), in OUR module
    # names (docs/devices.md; 4.38 has no tensor parallelism: the load plan refuses tp_plan there). Attention: q/k/v
    # colwise (each rank a subset of the heads; the attention reshapes with -1 heads), o rowwise (all-reduced). Every
    # Linear of a SwiGLU MLP (a dense layer's, each routed expert's, the shared expert's): gate/up colwise, down
    # rowwise, so each MLP call all-reduces its own output and returns the full result. The router (`mlp.gate`),
    # `shared_expert_gate` and the norms stay replicated, so every rank routes every token to the same experts and
    # the collectives line up; transformers adds `embed_tokens: embedding_rowwise`, and the causal LM its
    # `lm_head: colwise_gather_output`.
    # No partial sums can escape: the fast MoE backends read the experts' weight tensors directly, and a sharded
    # weight is a DTensor, which moe/weights.py never hands to a kernel (kind None: "tensor subclasses"), so a
    # sharded block always takes the torch reference path, which calls each expert's module (and its hooks).
    # Exact up to the order of summation: one all-reduce of two halves per o_proj / down_proj call.
    # `base_model_tp_plan` (below) takes the attention rules and those of the kinds of MLP the config has.
    TP_PLAN_ATTENTION = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
    }
    TP_PLAN_DENSE_MLP = {
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    TP_PLAN_MOE = {
        "layers.*.mlp.experts.*.gate_proj": "colwise",
        "layers.*.mlp.experts.*.up_proj": "colwise",
        "layers.*.mlp.experts.*.down_proj": "rowwise",
        "layers.*.mlp.shared_expert.gate_proj": "colwise",
        "layers.*.mlp.shared_expert.up_proj": "colwise",
        "layers.*.mlp.shared_expert.down_proj": "rowwise",
    }
    # Pipeline stages (transformers 5.x), as its own qwen2_moe config: what each part of the base model takes and
    # gives. transformers 5.23's pipeline parallelism does not read it yet, and the load plan refuses pp_size > 1
    # (its stages stand in identities for the layers they drop, which return a tensor where ours return a tuple).
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 2048,
        intermediate_size: int = 5632,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        num_key_value_heads: Optional[int] = 16,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        rope_theta: Optional[float] = None,
        rope_parameters: Optional[Dict[str, Any]] = None,
        rope_scaling: Optional[Dict[str, Any]] = None,
        use_sliding_window: bool = False,
        sliding_window: Optional[int] = 4096,
        max_window_layers: int = 28,
        attention_dropout: float = 0.0,
        decoder_sparse_step: int = 1,
        moe_intermediate_size: int = 1408,
        shared_expert_intermediate_size: int = 5632,
        num_experts_per_tok: int = 4,
        num_experts: int = 60,
        norm_topk_prob: bool = False,
        output_router_logits: bool = False,
        router_aux_loss_coef: float = 0.001,
        mlp_only_layers: Optional[Sequence[int]] = None,
        qkv_bias: bool = True,
        layer_types: Optional[Sequence[str]] = None,
        head_dim: Optional[int] = None,
        moe_backend: Optional[str] = None,
        pad_token_id: Optional[int] = None,
        bos_token_id: Optional[Union[int, List[int]]] = None,
        eos_token_id: Optional[Union[int, List[int]]] = None,
        **kwargs: Any,
    ) -> None:
        # Types and ranges first, before anything is derived from them (a string layer count, say).
        for name, value in locals().items():
            if name in FIELD_RULES and not (value is None and name in _DERIVED):
                check_field(name, value)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        # Qwen2 configs from before GQA set no KV heads: that means multi-head attention.
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window if use_sliding_window else None
        self.max_window_layers = max_window_layers
        self.attention_dropout = attention_dropout
        self.decoder_sparse_step = decoder_sparse_step
        self.moe_intermediate_size = moe_intermediate_size
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.num_experts_per_tok = num_experts_per_tok
        self.num_experts = num_experts
        self.norm_topk_prob = norm_topk_prob
        self.output_router_logits = output_router_logits
        self.router_aux_loss_coef = router_aux_loss_coef
        self.mlp_only_layers = [] if mlp_only_layers is None else mlp_only_layers
        self.qkv_bias = qkv_bias
        if head_dim is None:
            # Derived, and written out: transformers' own attention reads `head_dim` when the attribute exists.
            if hidden_size % num_attention_heads:
                raise _bad("hidden_size", f"a multiple of num_attention_heads ({num_attention_heads})", hidden_size)
            head_dim = hidden_size // num_attention_heads
        self.head_dim = head_dim
        # Which expert-dispatch backend runs this model (None: env QWEN2_MOE_HF_MOE_BACKEND, else "auto").
        self.moe_backend = moe_backend

        rope = _normalize_rope(rope_theta, rope_parameters, rope_scaling)
        self.rope_theta = rope["rope_theta"]
        self.rope_parameters = rope
        if layer_types is None:
            layer_types = [
                "sliding_attention"
                if self.use_sliding_window and (i + 1) % 2 and i < self.max_window_layers
                else "full_attention"
                for i in range(self.num_hidden_layers)
            ]
        self.layer_types = layer_types
        # Before the base class: 5.x's own validators would otherwise report some of these less plainly.
        self.validate()
        self.mlp_only_layers, self.layer_types = list(self.mlp_only_layers), list(self.layer_types)

        super().__init__(tie_word_embeddings=tie_word_embeddings, **compat.config_base_kwargs(kwargs))
        # 5.x's base __post_init__ standardizes rope_parameters in place; keep ours authoritative.
        self.rope_theta = rope["rope_theta"]
        self.rope_parameters = dict(rope)
        self.tie_word_embeddings = tie_word_embeddings
        # 4.x's base class takes these as arguments, 5.x's as plain attributes; set them the same way on both.
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.validate()  # again, with the fields the base class set

    @property
    def base_model_tp_plan(self) -> Dict[str, str]:
        """The tensor-parallel plan for the layers this config has (a rule that matches nothing makes transformers
        warn, and the released models have no dense layers)."""
        moe = [self.is_moe_layer(i) for i in range(self.num_hidden_layers)]
        return {**self.TP_PLAN_ATTENTION, **(self.TP_PLAN_DENSE_MLP if not all(moe) else {}),
                **(self.TP_PLAN_MOE if any(moe) else {})}

    @classmethod
    def from_dict(
        cls, config_dict: Dict[str, Any], **kwargs: Any
    ) -> Union["Qwen2MoeConfig", Tuple["Qwen2MoeConfig", Dict[str, Any]]]:
        # transformers sets from_pretrained's keyword arguments as attributes after __init__: validate them too.
        result = super().from_dict(config_dict, **kwargs)
        (result[0] if isinstance(result, tuple) else result).validate()
        return result

    @classmethod
    def _dict_from_json_file(cls, json_file):
        # config.json is untrusted: not UTF-8, not JSON, not an object or a key given twice raises CheckpointError
        # naming the file (transformers would raise TypeError / AttributeError, or keep the last duplicate).
        read_json_object(str(json_file))
        return super()._dict_from_json_file(json_file)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` has the sparse MoE block (else a dense MLP)."""
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value cannot describe a working model: each field's type
        and range (FIELD_RULES), then the rules between fields. Run by __init__, by from_dict after from_pretrained's
        keyword arguments are applied, and by every model and MoE block built from this config (so attributes
        changed by hand are checked too)."""
        for name in FIELD_RULES:
            value = getattr(self, name, _UNSET)
            if value is not _UNSET:  # the base class sets tie_word_embeddings and the token ids after __init__'s check
                check_field(name, value)
        if self.num_experts > 0:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise _bad(
                    "num_experts_per_tok", f"1 <= top-k <= num_experts ({self.num_experts})", self.num_experts_per_tok
                )
            if self.moe_intermediate_size < 1:
                raise _bad("moe_intermediate_size", "an integer >= 1 when num_experts > 0", self.moe_intermediate_size)
        if self.num_attention_heads % self.num_key_value_heads:
            raise _bad(
                "num_key_value_heads",
                f"a divisor of num_attention_heads ({self.num_attention_heads})",
                self.num_key_value_heads,
            )
        bad_layers = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad_layers:
            raise _bad("mlp_only_layers", f"layer indices in [0, {self.num_hidden_layers - 1}]", bad_layers)
        if len(self.layer_types) != self.num_hidden_layers:
            raise _bad("layer_types", f"{self.num_hidden_layers} entries from {LAYER_TYPES}", self.layer_types)
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise _bad("sliding_window", "an integer >= 1 when sliding attention is used", self.sliding_window)
        pad = getattr(self, "pad_token_id", None)
        if pad is not None and not -self.vocab_size <= pad < self.vocab_size:
            raise _bad("pad_token_id", f"null or an index into the vocabulary [0, {self.vocab_size})", pad)
        rope = getattr(self, "rope_parameters", None)
        if not isinstance(rope, dict) or rope.get("rope_type", "default") not in SUPPORTED_ROPE_TYPES:
            raise _bad("rope_parameters", f"a dict with rope_type one of {SUPPORTED_ROPE_TYPES}", rope)


def _normalize_rope(rope_theta, rope_parameters, rope_scaling):
    """One rope dict {"rope_type", "rope_theta"} from the 4.39 form, the 5.x form or both."""
    if rope_parameters is not None and not isinstance(rope_parameters, dict):
        raise _bad("rope_parameters", "a dict like {'rope_type': 'default', 'rope_theta': 1e6}", rope_parameters)
    if rope_scaling is not None and not isinstance(rope_scaling, dict):
        raise _bad("rope_scaling", "null or a dict", rope_scaling)
    rope = dict(rope_parameters or {})
    if rope_scaling:
        rope.update(rope_scaling)
    rope.setdefault("rope_theta", 1000000.0 if rope_theta is None else rope_theta)
    rope_type = rope.pop("type", None) or rope.get("rope_type") or "default"
    rope["rope_type"] = rope_type
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise _bad("rope_scaling / rope_parameters rope_type",
                   f"one of {SUPPORTED_ROPE_TYPES} (the types transformers {compat.TRANSFORMERS_VERSION} applies)",
                   rope_type)
    _check_rope_fields(rope, rope_type)
    theta = rope["rope_theta"]
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise _bad("rope_theta", "a number > 0", theta)
    rope["rope_theta"] = float(theta)
    return rope


# The fields each scaled rope_type reads, and what they must be (transformers only warns, then fails or computes
# nonsense at the first forward).
_ROPE_NUMBERS = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",), "llama3": (
    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _check_rope_fields(rope, rope_type):
    for key in _ROPE_NUMBERS.get(rope_type, ()):
        value = rope.get(key)
        if not _is_number(value) or not value > 0 or (key == "factor" and value < 1):
            raise _bad(f"rope_parameters.{key}", f"a number {'>= 1' if key == 'factor' else '> 0'} for rope_type "
                       f"{rope_type!r}", value)
    if rope_type == "longrope":
        for key in ("short_factor", "long_factor"):
            value = rope.get(key)
            if not isinstance(value, list) or not value or not all(_is_number(v) and v > 0 for v in value):
                raise _bad(f"rope_parameters.{key}", "a list of numbers > 0 (head_dim / 2 of them)", value)

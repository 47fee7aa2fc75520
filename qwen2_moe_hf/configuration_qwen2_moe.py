"""Qwen2MoeConfig: the hub's qwen2_moe config.json, readable on transformers 4.38.2 and 5.x.

The hub files are in the 4.39 form (`rope_theta`, `torch_dtype`); transformers 5.x writes `rope_parameters`, `dtype`
and `layer_types`. Both load here, and what we save carries both `rope_theta` and `rope_parameters` so either stack
reads it back. Defaults are transformers' (Qwen1.5-MoE-A2.7B).
"""

from transformers import PretrainedConfig

from . import compat
from .checkpoint_io import read_json_object

SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
SUPPORTED_ROPE_TYPES = ("default",)
LAYER_TYPES = ("full_attention", "sliding_attention")


def _bad(field, expected, got):
    return ValueError(f"Qwen2MoeConfig.{field}: expected {expected}, got {got!r}")


class Qwen2MoeConfig(PretrainedConfig):
    model_type = "qwen2_moe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        hidden_act="silu",
        max_position_embeddings=32768,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        tie_word_embeddings=False,
        rope_theta=None,
        rope_parameters=None,
        rope_scaling=None,
        use_sliding_window=False,
        sliding_window=4096,
        max_window_layers=28,
        attention_dropout=0.0,
        decoder_sparse_step=1,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
        num_experts_per_tok=4,
        num_experts=60,
        norm_topk_prob=False,
        output_router_logits=False,
        router_aux_loss_coef=0.001,
        mlp_only_layers=None,
        qkv_bias=True,
        layer_types=None,
        head_dim=None,
        moe_backend=None,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        **kwargs,
    ):
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
        self.mlp_only_layers = [] if mlp_only_layers is None else list(mlp_only_layers)
        self.qkv_bias = qkv_bias
        if head_dim is None:
            # Derived, and written out: transformers' own attention reads `head_dim` when the attribute exists.
            if isinstance(hidden_size, int) and isinstance(num_attention_heads, int) and num_attention_heads > 0:
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
        self.layer_types = list(layer_types)
        # Before the base class: 5.x's own validators would otherwise report some of these less plainly.
        self.validate()

        super().__init__(tie_word_embeddings=tie_word_embeddings, **compat.config_base_kwargs(kwargs))
        # 5.x's base __post_init__ standardizes rope_parameters in place; keep ours authoritative.
        self.rope_theta = rope["rope_theta"]
        self.rope_parameters = dict(rope)
        self.tie_word_embeddings = tie_word_embeddings
        # 4.x's base class takes these as arguments, 5.x's as plain attributes; set them the same way on both.
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    @classmethod
    def _dict_from_json_file(cls, json_file):
        # config.json is untrusted: not UTF-8, not JSON, not an object or a key given twice raises CheckpointError
        # naming the file (transformers would raise TypeError / AttributeError, or keep the last duplicate).
        read_json_object(str(json_file))
        return super()._dict_from_json_file(json_file)

    def is_moe_layer(self, layer_idx):
        """Whether decoder layer `layer_idx` has the sparse MoE block (else a dense MLP)."""
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    def validate(self):
        """Raise ValueError naming the first field whose value cannot describe a working model."""
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "decoder_sparse_step",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _bad(name, "an integer >= 1", value)
        for name in ("num_experts", "moe_intermediate_size", "shared_expert_intermediate_size", "num_experts_per_tok"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise _bad(name, "an integer >= 0", value)
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
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim < 1:
            raise _bad("head_dim", "an integer >= 1 (or null: hidden_size // num_attention_heads)", self.head_dim)
        if self.head_dim % 2:
            raise _bad("head_dim", "an even size (RoPE rotates pairs)", self.head_dim)
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise _bad("hidden_act", f"one of {SUPPORTED_ACTIVATIONS}", self.hidden_act)
        bad_layers = [i for i in self.mlp_only_layers if not isinstance(i, int) or not 0 <= i < self.num_hidden_layers]
        if bad_layers:
            raise _bad("mlp_only_layers", f"layer indices in [0, {self.num_hidden_layers - 1}]", bad_layers)
        if not isinstance(self.rms_norm_eps, (int, float)) or not self.rms_norm_eps > 0:
            raise _bad("rms_norm_eps", "a number > 0", self.rms_norm_eps)
        if not isinstance(self.attention_dropout, (int, float)) or not 0 <= self.attention_dropout < 1:
            raise _bad("attention_dropout", "a number in [0, 1)", self.attention_dropout)
        if len(self.layer_types) != self.num_hidden_layers or any(t not in LAYER_TYPES for t in self.layer_types):
            raise _bad(
                "layer_types", f"{self.num_hidden_layers} entries from {LAYER_TYPES}", self.layer_types
            )
        if "sliding_attention" in self.layer_types and not (
            isinstance(self.sliding_window, int) and self.sliding_window >= 1
        ):
            raise _bad("sliding_window", "an integer >= 1 when sliding attention is used", self.sliding_window)
        if self.moe_backend is not None and not isinstance(self.moe_backend, str):
            raise _bad("moe_backend", "a backend name or null", self.moe_backend)


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
        raise _bad("rope_parameters.rope_type", f"one of {SUPPORTED_ROPE_TYPES} (Qwen1.5-MoE uses plain RoPE)", rope_type)
    theta = rope["rope_theta"]
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise _bad("rope_theta", "a number > 0", theta)
    rope["rope_theta"] = float(theta)
    return rope

"""The LLaMA-family configurations: `LlamaConfig`, the Hugging Face families it covers (`FAMILIES`), the
architecture presets, and every table of Hugging Face config.json fields (copied, required, interpreted,
neutral, metadata) with the checks that read a config.json into a `LlamaConfig`.

`LlamaConfig.model_type` names the Hugging Face family a config belongs to; the config fields say which
features of the decoder (`notellm_jax.model.llama`) it uses, so the decoder itself has no per-family code.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from notellm_jax.errors import CheckpointError
from notellm_jax.model.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from notellm_jax.model.precision import Precision

# Hugging Face config.json fields copied one to one (same names) into LlamaConfig.
_HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps", "max_position_embeddings",
              "tie_word_embeddings", "bos_token_id", "eos_token_id")
# HF fields that change the architecture, with the only value this port implements.
_HF_REQUIRED = {"mlp_bias": False, "pretraining_tp": 1, "partial_rotary_factor": 1.0,
                "use_sliding_window": False}
# Gemma's fields copied one to one (config.json name -> LlamaConfig name).
_HF_GEMMA_FIELDS = {"query_pre_attn_scalar": "query_pre_attn_scalar", "attn_logit_softcapping":
                    "attn_logit_softcapping", "final_logit_softcapping": "final_logit_softcapping",
                    "rope_local_base_freq": "rope_local_theta"}
# The other config.json fields `from_hf_dict` interprets (family, biases, RoPE scaling, windows, layer kinds,
# the MLP activation under its two names).
_HF_INTERPRETED = ("model_type", "attention_bias", "rope_scaling", "sliding_window", "max_window_layers",
                   "layer_types", "hidden_act")
_HF_GEMMA_INTERPRETED = ("hidden_activation", "sliding_window_pattern", "_sliding_window_pattern",
                         *_HF_GEMMA_FIELDS)  # known in Gemma families only
_LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


@dataclasses.dataclass(frozen=True)
class Family:
    """What a Hugging Face `model_type` fixes: its transformers class, its attention-projection biases
    ((q/k/v, o), or None where config.json's `attention_bias` sets both), per-head q/k RMSNorm, whether
    config.json's `sliding_window` applies, the LlamaConfig fields of `FIXED_FIELDS` it sets (`fixed`; the
    others keep their defaults), the optional fields it may set (`optional`), and HF's config-class
    defaults for architecture fields a config.json may leave out (`hf_defaults`)."""
    architecture: str
    biases: tuple[bool, bool] | None
    qk_norm: bool
    sliding_window: bool
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)
    optional: frozenset[str] = frozenset()
    hf_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)


# Architecture switches a family fixes (Gemma's block and MLP); every other family keeps the defaults.
FIXED_FIELDS = ("hidden_act", "norm_unit_offset", "sandwich_norms", "scale_embeddings")
_GEMMA = dict(hidden_act="gelu_pytorch_tanh", norm_unit_offset=True, sandwich_norms=True, scale_embeddings=True)
_GEMMA_OPTIONAL = frozenset({"query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                             "layer_types"})
_GEMMA_DEFAULTS = dict(rms_norm_eps=1e-6, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                       tie_word_embeddings=True)

FAMILIES = {
    "llama": Family("LlamaForCausalLM", None, False, False),
    "qwen2": Family("Qwen2ForCausalLM", (True, False), False, False),  # q/k/v bias always, no o bias
    "qwen3": Family("Qwen3ForCausalLM", None, True, False),
    "mistral": Family("MistralForCausalLM", (False, False), False, True),
    "gemma2": Family("Gemma2ForCausalLM", (False, False), False, True, _GEMMA, _GEMMA_OPTIONAL,
                     {**_GEMMA_DEFAULTS, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    # Gemma 3: transformers' attention ignores config.json's attn_logit_softcapping, and so does this port.
    "gemma3_text": Family("Gemma3ForCausalLM", (False, False), True, True, _GEMMA,
                          _GEMMA_OPTIONAL - {"attn_logit_softcapping"} | {"rope_local_theta"},
                          {**_GEMMA_DEFAULTS, "rope_theta": 1e6, "rope_local_base_freq": 10000.0}),
}
LAYER_TYPES = ("sliding_attention", "full_attention")
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    model_type: str = "llama"            # the HF family (FAMILIES): decides the export's class and config
    # RoPE frequencies: "default" (theta only), "linear" (divided by rope_factor: Gemma 3's global layers) or
    # "llama3" (LLaMA-3.1/3.2 scaling with the fields below).
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    attention_bias: bool = False         # biases on q/k/v (Qwen2, or LLaMA/Qwen3 with attention_bias)
    attention_out_bias: bool = False     # bias on o (LLaMA/Qwen3 with attention_bias)
    qk_norm: bool = False                # per-head RMSNorm on q and k before RoPE (Qwen3)
    sliding_window: int | None = None    # a query sees the last `sliding_window` positions (Mistral, Gemma)
    # Gemma 2/3 (all defaults: off). The MLP's activation ("silu" SwiGLU, "gelu_pytorch_tanh" GeGLU);
    # RMSNorm scaling by (1 + scale); a norm on the attention and MLP outputs too (four per block);
    # token embeddings times sqrt(hidden_size) (rounded to the compute dtype, as HF does).
    hidden_act: str = "silu"
    norm_unit_offset: bool = False
    sandwich_norms: bool = False
    scale_embeddings: bool = False
    query_pre_attn_scalar: float | None = None    # attention scale 1/sqrt(this) (None: 1/sqrt(head_dim))
    attn_logit_softcapping: float | None = None   # scores -> c * tanh(scores / c) before the mask (Gemma 2)
    final_logit_softcapping: float | None = None  # the LM head's logits likewise (Gemma 2)
    # Per layer "sliding_attention" (the window applies) or "full_attention"; None: the window, if any,
    # applies to every layer (Mistral). Sliding layers use RoPE base `rope_local_theta` without scaling
    # when it is set (Gemma 3), the global base and scaling otherwise.
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None
    # Runtime choices, not part of the checkpoint.
    compute_dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    attention: str = "einsum"  # the attention core: see notellm_jax.model.attention
    # Embedding and head tables get padded_vocab_size entries (HF's pad_to_multiple_of): an odd vocabulary
    # (32,001 with [EMB]) would otherwise not shard over `tensor`. Padded rows are zero, their logits masked.
    vocab_pad_multiple: int = 1

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                                 f"num_attention_heads {self.num_attention_heads}; give head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} not in {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention {self.attention!r} not in {ATTENTION_IMPLEMENTATIONS}")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act {self.hidden_act!r} not in {HIDDEN_ACTS}")
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))  # hashable (jit static argument)
            if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - set(LAYER_TYPES):
                raise ValueError(f"layer_types must give one of {LAYER_TYPES} for each of the "
                                 f"{self.num_hidden_layers} layers, got {self.layer_types}")
        self._check_family()
        self._check_attention_implementation()

    def _check_attention_implementation(self) -> None:
        """splash's kernel sees causal + padding only; jax.nn.dot_product_attention has no logit soft-cap."""
        softcap = self.attn_logit_softcapping is not None
        if self.attention == "splash" and (self.sliding_window is not None or softcap):
            raise ValueError("attention 'splash' expresses causal + padding masks only: a sliding window or "
                             "attention-logit soft-capping needs attention 'einsum' (or 'dot_product' without "
                             "soft-capping)")
        if self.attention == "dot_product" and softcap:
            raise ValueError("attention 'dot_product' has no attention-logit soft-capping: use 'einsum'")

    def _check_family(self) -> None:
        """Every config is one HF family's architecture, so that save_hf can write it as that family."""
        family = FAMILIES.get(self.model_type)
        if family is None:
            raise ValueError(f"model_type {self.model_type!r} not in {sorted(FAMILIES)}")
        biases = (self.attention_bias, self.attention_out_bias)
        if biases != (family.biases or (self.attention_bias,) * 2):
            raise ValueError(f"{self.model_type}: attention biases (q/k/v, o) = {biases} do not exist in this "
                             f"family (it has {family.biases or 'both or neither'})")
        if self.qk_norm != family.qk_norm:
            raise ValueError(f"{self.model_type}: qk_norm={self.qk_norm}, the family has {family.qk_norm}")
        if self.sliding_window is not None and (not family.sliding_window or self.sliding_window < 1):
            raise ValueError(f"{self.model_type}: sliding_window={self.sliding_window} is not supported")
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope_type {self.rope_type!r} not in ('default', 'linear', 'llama3')")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in FIXED_FIELDS:
            if getattr(self, name) != family.fixed.get(name, defaults[name]):
                raise ValueError(f"{self.model_type}: {name}={getattr(self, name)!r}, the family has "
                                 f"{family.fixed.get(name, defaults[name])!r}")
        foreign = sorted(n for n in _GEMMA_OPTIONAL | {"rope_local_theta"}
                         if n not in family.optional and getattr(self, n) is not None)
        if foreign:
            raise ValueError(f"{self.model_type}: {', '.join(foreign)} do not exist in this family")

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    @property
    def precision(self) -> Precision:
        return Precision(param_dtype=self.param_dtype, compute_dtype=self.compute_dtype)

    @property
    def local_layers(self) -> tuple[bool, ...]:
        """Per layer, whether it is a sliding (local) one: `sliding_window`, if set, applies to it, and so does
        `rope_local_theta`. Without `layer_types` every layer is."""
        if self.layer_types is None:
            return (True,) * self.num_hidden_layers
        return tuple(kind == "sliding_attention" for kind in self.layer_types)

    @property
    def attention_scale(self) -> float:
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_pad_multiple) * self.vocab_pad_multiple

    @property
    def dtype(self):
        return self.precision.compute

    def num_params(self) -> int:
        x, m, v, d = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        h, k = self.num_attention_heads, self.num_key_value_heads
        attn = x * d * (2 * h + 2 * k) + self.attention_bias * (h + 2 * k) * d + self.attention_out_bias * x
        layer = attn + 3 * x * m + (4 if self.sandwich_norms else 2) * x + self.qk_norm * 2 * d
        head = 0 if self.tie_word_embeddings else x * v
        return v * x + self.num_hidden_layers * layer + x + head

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **runtime) -> "LlamaConfig":
        """Build from a Hugging Face config.json dict; refuses fields that would change the model."""
        model_type = hf.get("model_type", "llama")
        if model_type not in FAMILIES:
            raise ValueError(f"unsupported config field model_type={model_type!r} (this port implements "
                             f"{', '.join(sorted(FAMILIES))})")
        family = FAMILIES[model_type]
        hf = {**family.hf_defaults, **hf}  # what the family's HF config class assumes when a field is absent
        _refuse_unsupported(hf, family)
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise ValueError(f"config is missing required fields: {', '.join(missing)}")
        kwargs = {k: hf[k] for k in _HF_FIELDS if hf.get(k) is not None}
        kwargs.setdefault("num_key_value_heads", hf["num_attention_heads"])
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        biases = family.biases or (bool(hf.get("attention_bias", False)),) * 2
        window = hf.get("sliding_window") if family.sliding_window else None
        return cls(**kwargs, **_rope_fields(hf.get("rope_scaling")), **_gemma_fields(hf, family),
                   **family.fixed, model_type=model_type, attention_bias=biases[0], attention_out_bias=biases[1],
                   qk_norm=family.qk_norm, sliding_window=window, **runtime)

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json of this model's family, loadable by its transformers class."""
        out = {k: getattr(self, k) for k in _HF_FIELDS}
        rope = {"default": None, "linear": {"rope_type": "linear", "factor": self.rope_factor}}.get(self.rope_type, {
            "rope_type": "llama3", "factor": self.rope_factor, "low_freq_factor": self.rope_low_freq_factor,
            "high_freq_factor": self.rope_high_freq_factor,
            "original_max_position_embeddings": self.rope_original_max_position})
        out.update(architectures=[FAMILIES[self.model_type].architecture], model_type=self.model_type,
                   hidden_act=self.hidden_act, rope_scaling=rope, initializer_range=0.02, torch_dtype="float32",
                   use_cache=True)
        if FAMILIES[self.model_type].optional:  # Gemma 2 / 3
            out.update({hf: getattr(self, ours) for hf, ours in _HF_GEMMA_FIELDS.items()
                        if ours in FAMILIES[self.model_type].optional},
                       hidden_activation=self.hidden_act, attention_bias=False, sliding_window=self.sliding_window,
                       layer_types=list(self.layer_types or ["full_attention"] * self.num_hidden_layers))
        if self.model_type in ("llama", "qwen3"):
            out["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            out["mlp_bias"] = False
        if self.model_type in ("qwen2", "qwen3"):
            out.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_hidden_layers)
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        return out


def _refuse_unsupported(hf: dict[str, Any], family: Family) -> None:
    activation = family.fixed.get("hidden_act", "silu")
    for key, expected in {**_HF_REQUIRED, "hidden_act": activation, "hidden_activation": activation}.items():
        if hf.get(key) is not None and hf[key] != expected:
            raise ValueError(f"unsupported config field {key}={hf[key]!r} (this port implements "
                             f"{key}={expected!r})")
    layer_types = hf.get("layer_types") or []
    allowed = LAYER_TYPES if "layer_types" in family.optional else ("full_attention",)
    if any(kind not in allowed for kind in layer_types):
        raise ValueError(f"unsupported config field layer_types={sorted(set(layer_types))} (this port "
                         f"implements {list(allowed)} in this family)")


def _gemma_fields(hf: dict[str, Any], family: Family) -> dict[str, Any]:
    """LlamaConfig's Gemma fields from config.json: the soft-caps, the attention scalar, the local RoPE base
    and the layer pattern (HF's default where config.json has none: Gemma 2 alternates sliding and full
    layers, Gemma 3 makes every `sliding_window_pattern`-th layer (default 6) full)."""
    if not family.optional:
        return {}
    out = {ours: hf.get(key) for key, ours in _HF_GEMMA_FIELDS.items() if ours in family.optional}
    n = hf["num_hidden_layers"]
    period = 2 if "rope_local_theta" not in family.optional else \
        hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
    out["layer_types"] = tuple(hf.get("layer_types") or
                               ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n)])
    return out


def _rope_fields(scaling: Any) -> dict[str, Any]:
    """LlamaConfig's rope_* fields from config.json's `rope_scaling` (None, 'default' or 'llama3')."""
    if not scaling:
        return {}
    if not isinstance(scaling, dict):
        raise ValueError(f"unsupported config field rope_scaling={scaling!r} (expected an object or null)")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return {}
    if kind == "linear":
        if "factor" not in scaling:
            raise ValueError("config field rope_scaling (linear) lacks factor")
        return {"rope_type": "linear", "rope_factor": float(scaling["factor"])}
    if kind != "llama3":
        raise ValueError(f"unsupported config field rope_scaling.rope_type={kind!r} (this port implements "
                         "'default', 'linear' and 'llama3')")
    missing = [k for k in _LLAMA3_ROPE if k not in scaling]
    if missing:
        raise ValueError(f"config field rope_scaling (llama3) lacks {', '.join(missing)}")
    return {"rope_type": "llama3", "rope_factor": float(scaling["factor"]),
            "rope_low_freq_factor": float(scaling["low_freq_factor"]),
            "rope_high_freq_factor": float(scaling["high_freq_factor"]),
            "rope_original_max_position": int(scaling["original_max_position_embeddings"])}


# Architecture presets (public shapes). Vocab sizes are the base models'; NoteLLM adds [EMB] on load.
# The LLaMA-3, Qwen and Mistral entries copy the config.json published with each model on the Hugging Face
# hub (meta-llama/Llama-3.1-8B, meta-llama/Llama-3.2-1B, Qwen/Qwen2.5-1.5B, Qwen/Qwen2.5-7B, Qwen/Qwen3-1.7B,
# Qwen/Qwen3-8B, mistralai/Mistral-7B-v0.3 and -v0.1); only the architectural fields are kept.
_LLAMA3_SCALING = dict(rope_type="llama3", rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                       rope_original_max_position=8192)
_MISTRAL_7B = dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                   rope_theta=1e6, model_type="mistral")


def _gemma_layers(n: int, period: int) -> tuple[str, ...]:
    """HF's default Gemma pattern: every `period`-th layer full attention, the others sliding."""
    return tuple("sliding_attention" if (i + 1) % period else "full_attention" for i in range(n))


# Gemma: google/gemma-2-9b and google/gemma-3-270m (config.json; 270M: 18 layers, d 640, 4 heads x 256, 1 KV head).
_GEMMA_ARCH = dict(head_dim=256, rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
                   query_pre_attn_scalar=256, **_GEMMA)
PRESETS: dict[str, dict[str, Any]] = {
    "gemma2_9b": dict(vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                      num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=8192,
                      sliding_window=4096, layer_types=_gemma_layers(42, 2), attn_logit_softcapping=50.0,
                      final_logit_softcapping=30.0, model_type="gemma2", **_GEMMA_ARCH),
    "gemma3_270m": dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=32768, rope_theta=1e6,
                        rope_local_theta=10000.0, sliding_window=512, layer_types=_gemma_layers(18, 6),
                        model_type="gemma3_text", qk_norm=True, **_GEMMA_ARCH),
    "llama2_7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "llama2_13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096),
    "llama2_70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096),
    "llama3_1_8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                        max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001,
                        rope_factor=8.0, **_LLAMA3_SCALING),
    "llama3_2_1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                        max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001,
                        tie_word_embeddings=True, rope_factor=32.0, **_LLAMA3_SCALING),
    "qwen2_5_1_5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                         max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=151643,
                         eos_token_id=151643, model_type="qwen2", attention_bias=True),
    "qwen2_5_7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6, rms_norm_eps=1e-6,
                       max_position_embeddings=131072, bos_token_id=151643, eos_token_id=151643,
                       model_type="qwen2", attention_bias=True),
    "qwen3_1_7b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
                       rms_norm_eps=1e-6, max_position_embeddings=40960, tie_word_embeddings=True,
                       bos_token_id=151643, eos_token_id=151645, model_type="qwen3", qk_norm=True),
    "qwen3_8b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
                     rms_norm_eps=1e-6, max_position_embeddings=40960, bos_token_id=151643,
                     eos_token_id=151645, model_type="qwen3", qk_norm=True),
    "mistral_7b": _MISTRAL_7B,  # v0.3: full attention (sliding_window null)
    "mistral_7b_v0_1": {**_MISTRAL_7B, "vocab_size": 32000, "rope_theta": 10000.0, "sliding_window": 4096},
    "smollm2_135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                         tie_word_embeddings=True, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2),
    "stories260k": dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=5,
                        num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True,
                        max_position_embeddings=512),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    # Tests: Gemma 2's block with soft-caps low enough to bite at random init and a window shorter than a prompt.
    "tiny_gemma2": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, model_type="gemma2",
                        **{**_GEMMA_ARCH, "head_dim": 16, "query_pre_attn_scalar": 16}, sliding_window=6,
                        layer_types=_gemma_layers(4, 2), attn_logit_softcapping=2.0, final_logit_softcapping=1.0),
}


def preset(name: str, **overrides) -> LlamaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return LlamaConfig(**{**PRESETS[name], **overrides})


# config.json fields that describe no part of the computation (bookkeeping, generation defaults, output
# flags, label maps): accepted and not used. Any field outside these, the ones LlamaConfig reads and the
# architecture fields it checks is refused: an ignored field could silently mean another model.
_HF_METADATA = frozenset({
    "_name_or_path", "architectures", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "initializer_range", "pad_token_id", "sep_token_id", "decoder_start_token_id", "tokenizer_class",
    "is_llama_config", "transformers.js_config", "return_dict", "output_attentions", "output_hidden_states",
    "torchscript", "use_bfloat16", "tf_legacy_loss", "id2label", "label2id", "problem_type", "finetuning_task",
    "task_specific_params", "prefix", "chunk_size_feed_forward", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "cache_implementation"})
# Fields that would change the model, accepted only at the value this port implements.
_HF_NEUTRAL = {"partial_rotary_factor": 1.0, "attention_dropout": 0.0, "rope_interleaved": False,
               "is_encoder_decoder": False, "add_cross_attention": False, "tie_encoder_decoder": False,
               "is_decoder": False, "pruned_heads": {}, "cross_attention_hidden_size": None,
               "use_bidirectional_attention": False}
_HF_COUNTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings")


def check_hf_config(hf: dict[str, Any], source: Path | str) -> dict[str, Any]:
    """`hf` checked field by field (CheckpointError naming `source` and the field): counts are positive
    integers that divide as attention needs; neutral-valued fields hold their neutral value; no field is
    unknown. Returns it with `rope_scaling: {"rope_type": "default"}` (HF's spelling of none) as None."""
    known = set(_HF_FIELDS) | set(_HF_REQUIRED) | set(_HF_INTERPRETED) | set(_HF_NEUTRAL) | _HF_METADATA
    if FAMILIES.get(hf.get("model_type"), FAMILIES["llama"]).optional:
        known |= set(_HF_GEMMA_INTERPRETED)
    unknown = sorted(k for k in hf if k not in known)
    if unknown:
        raise CheckpointError(f"{source}: unsupported config field(s) {unknown} (not implemented by this LLaMA "
                              "port, so they cannot be honoured; remove them only if they do not change the model)")
    for key, neutral in _HF_NEUTRAL.items():
        if key in hf and hf[key] != neutral and not (neutral in ({}, None) and not hf[key]):
            raise CheckpointError(f"{source}: unsupported config field {key}={hf[key]!r} (this LLaMA port "
                                  f"implements {key}={neutral!r})")
    for key in _HF_COUNTS:
        value = hf.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise CheckpointError(f"{source}: config field {key}={value!r} must be a positive integer")
    heads, kv_heads = hf.get("num_attention_heads"), hf.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise CheckpointError(f"{source}: config field num_key_value_heads={kv_heads} does not divide "
                              f"num_attention_heads={heads}")
    scaling = hf.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "default":
        hf = {**hf, "rope_scaling": None}  # HF's "default" rope type is unscaled RoPE
    return hf


def config_from_hf(hf_config: dict[str, Any], source: Path | str, **runtime: Any) -> LlamaConfig:
    """A checkpoint's LlamaConfig from its config.json dict (`check_hf_config`, then
    `LlamaConfig.from_hf_dict` with the run's `runtime` fields); any refusal is a CheckpointError naming
    `source`."""
    hf_config = check_hf_config(hf_config, source)
    try:
        return LlamaConfig.from_hf_dict(hf_config, **runtime)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: {e}") from e

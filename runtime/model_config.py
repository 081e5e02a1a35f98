"""Llama-style model configurations: Hugging Face ``config.json`` files and shipped presets.

Every field of a ``config.json`` is either honoured or refused with one line naming it and
its value, never silently dropped: a runtime that loads a popular checkpoint and quietly
computes something else is the worst failure it can have. ``head_dim`` defaults to hidden /
heads and ``num_key_value_heads`` to the number of heads (multi-head attention), as in
transformers. ``rope_theta`` is read at the top level (transformers 4.x) or under
``rope_parameters`` (5.x), and so is the rope scaling: ``rope_scaling`` (4.x) or
``rope_parameters`` (5.x), with ``rope_type`` (or the older ``type``) ``default``, ``linear``
(``factor``) or ``llama3`` (``factor``, ``low_freq_factor``, ``high_freq_factor``,
``original_max_position_embeddings``; Llama 3.1 / 3.2), computed as transformers computes
them (``runtime.rope_frequencies``). The lists below say what is accepted and why.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from .rope_frequencies import PARAMETERS as ROPE_PARAMETERS
from .rope_frequencies import ROPE_TYPES, rope_attrs, rope_problem

# The decoder is Llama's (RMSNorm, bias-free projections, rotate-half RoPE, grouped-query
# attention, SwiGLU). Mistral is the same network plus an optional sliding window (refused at
# run time for sequences longer than it, see ``ModelConfig.check_sequence``).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
# Why some popular look-alikes are refused, said in the error line.
_WHY_NOT = {"Qwen2ForCausalLM": "its q/k/v projections have biases", "qwen2": "its q/k/v projections have biases",
            "GemmaForCausalLM": "it scales embeddings, offsets its norms, gates with GeLU", "gemma": "it scales embeddings, offsets its norms, gates with GeLU",
            "MixtralForCausalLM": "its MLP is a mixture of experts", "mixtral": "its MLP is a mixture of experts"}
# silu and swish are the same function (x * sigmoid(x)), the gate of SwiGLU.
SUPPORTED_ACTIVATIONS = ("silu", "swish")
# Rotary embedding variants implemented (``runtime.rope_frequencies``); dynamic, yarn,
# longrope ... change the frequencies (some with the sequence length, some scale the
# attention too) and would give other logits, so they are refused.
SUPPORTED_ROPE_TYPES = ROPE_TYPES

# Fields read into ModelConfig or checked by ``from_hf_dict`` (honoured, or refused by value).
READ_FIELDS = frozenset({
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "num_hidden_layers", "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "tie_word_embeddings", "max_position_embeddings", "sliding_window", "architectures", "model_type",
    "hidden_act", "attention_bias", "mlp_bias", "pretraining_tp"})
# Fields that change nothing a greedy decoder computes from the weights: token ids (the
# caller's business), training-only settings (initialisation, dropout: inference has none),
# the storage dtype (weights become float32 on load), the attention implementation transformers
# picks (same math), and bookkeeping. Any field on neither list is refused by name, so a new
# semantics is never dropped silently; add a field here only once it is known to be harmless.
HARMLESS_FIELDS = frozenset({
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "bos_token_id", "eos_token_id",
    "pad_token_id", "initializer_range", "use_cache", "attention_dropout", "max_sequence_length",
    "output_attentions", "output_hidden_states", "return_dict", "torchscript", "_attn_implementation_autoset",
    "tokenizer_class", "id2label", "label2id"})
# Keys inside ``rope_scaling`` / ``rope_parameters`` that any rope may carry (its type and,
# under ``rope_parameters``, the base); the scaling parameters depend on the type.
_ROPE_TYPE_KEYS = ("rope_type", "type")
# ModelConfig's field for each scaling parameter
_ROPE_FIELDS = {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
                "high_freq_factor": "rope_high_freq_factor",
                "original_max_position_embeddings": "rope_original_max_position_embeddings"}


@dataclass(frozen=True)
class ModelConfig:
    name: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    sliding_window: int | None = None  # Mistral: each token attends to at most this many; None: all
    # rope scaling (``runtime.rope_frequencies``): the parameters of ``rope_type`` are set, the others None
    rope_type: str = "default"
    rope_factor: float | None = None
    rope_low_freq_factor: float | None = None
    rope_high_freq_factor: float | None = None
    rope_original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        for field in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                      "num_hidden_layers", "vocab_size", "max_position_embeddings"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model {self.name}: {field} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"model {self.name}: num_attention_heads = {self.num_attention_heads} must be a "
                             f"multiple of num_key_value_heads = {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"model {self.name}: head_dim = {self.head_dim} must be even (rotary embedding)")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError(f"model {self.name}: rms_norm_eps and rope_theta must be positive")
        window = self.sliding_window
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
            raise ValueError(f"model {self.name}: sliding_window must be a positive integer or null, got {window!r}")
        takes = ROPE_PARAMETERS.get(self.rope_type, ())
        stray = [f for p, f in _ROPE_FIELDS.items() if p not in takes and getattr(self, f) is not None]
        if stray:
            raise ValueError(f"model {self.name}: {stray[0]} = {getattr(self, stray[0])!r} does not apply to "
                             f"rope_type {self.rope_type!r}")
        problem = rope_problem(self.rope_type, self.rope_scaling)
        if problem:
            raise ValueError(f"model {self.name}: rope {problem}")

    @property
    def rope_scaling(self) -> dict[str, float | int]:
        """The parameters of the rope type by transformers' names (empty for ``default``)."""
        return {p: getattr(self, _ROPE_FIELDS[p]) for p in ROPE_PARAMETERS.get(self.rope_type, ())
                if getattr(self, _ROPE_FIELDS[p]) is not None}

    @property
    def rope_attrs(self) -> dict[str, Any]:
        """The rope kernel's attributes: ``{"theta": ...}`` for a default rope, plus the type and
        its parameters for a scaled one."""
        return rope_attrs(self.rope_theta, self.rope_type, **self.rope_scaling)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def parameters(self) -> int:
        """Number of weights (embedding and LM head counted once each unless tied)."""
        h, i = self.hidden_size, self.intermediate_size
        layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_hidden_layers * layer + self.vocab_size * h + head + h

    def check_sequence(self, tokens: int) -> None:
        """Refuse a sequence of ``tokens`` (prompt + new tokens) longer than the sliding window:
        the runtime attends to the whole cache, the model only to the last ``sliding_window``
        tokens, so past the window the two would give different logits."""
        if self.sliding_window is not None and tokens > self.sliding_window:
            raise ValueError(f"model {self.name}: {tokens} tokens (prompt + new tokens) exceed its sliding_window "
                             f"of {self.sliding_window}; sliding-window attention is not implemented, so a "
                             "sequence must fit in the window")

    def to_hf_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("name")
        for field in ("rope_type", *_ROPE_FIELDS.values()):
            data.pop(field)
        if self.rope_type != "default":  # transformers 4.x layout, beside the top-level rope_theta
            data["rope_scaling"] = {"rope_type": self.rope_type, **self.rope_scaling}
        if self.sliding_window is None:
            data.pop("sliding_window")
            data.update(model_type="llama", architectures=["LlamaForCausalLM"])
        else:
            data.update(model_type="mistral", architectures=["MistralForCausalLM"])
        data.update(hidden_act="silu")
        return data

    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any], name: str = "model", source: str | None = None) -> "ModelConfig":
        """The config a transformers ``config.json`` (4.x or 5.x layout) describes, or a
        ValueError of one line naming the first field that is not implemented. ``source``
        begins that line (the file's path); by default ``model config NAME``."""
        where = source or f"model config {name}"
        _check_family(data, where)
        unknown = sorted(k for k in data if k not in READ_FIELDS and k not in HARMLESS_FIELDS)
        if unknown:
            more = f" (and {', '.join(unknown[1:4])}{' ...' if len(unknown) > 4 else ''})" if len(unknown) > 1 else ""
            raise ValueError(f"{where}: unknown field {unknown[0]} = {_show(data[unknown[0]])}{more} is refused: "
                             "it may change the computation, and this runtime does not implement it")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                               "vocab_size") if k not in data]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        _check_layers(data, where)
        heads = data["num_attention_heads"]
        head_dim = data.get("head_dim") or (data["hidden_size"] // heads if isinstance(heads, int) and heads else 0)
        rope_type, scaling = _rope_scaling(data, where)
        return cls(name=name, hidden_size=data["hidden_size"], intermediate_size=data["intermediate_size"],
                   num_attention_heads=heads, num_key_value_heads=data.get("num_key_value_heads") or heads,
                   head_dim=head_dim, num_hidden_layers=data["num_hidden_layers"], vocab_size=data["vocab_size"],
                   rms_norm_eps=_or(_optional_number(data.get("rms_norm_eps"), "rms_norm_eps", where), 1e-5),
                   rope_theta=_rope_theta(data, where),
                   tie_word_embeddings=_flag(data, "tie_word_embeddings", where),
                   max_position_embeddings=_or(data.get("max_position_embeddings"), 4096),
                   sliding_window=data.get("sliding_window"), rope_type=rope_type,
                   **{_ROPE_FIELDS[p]: v for p, v in scaling.items()})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_family(data: Mapping[str, Any], where: str) -> None:
    """``architectures`` and ``model_type``: the Llama network (Llama, Mistral), or refused."""
    architectures = data.get("architectures")
    if architectures is not None:
        if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
            raise ValueError(f"{where}: architectures = {_show(architectures)} is not a list of class names")
        for arch in architectures:
            if arch not in SUPPORTED_ARCHITECTURES:
                why = f" ({_WHY_NOT[arch]})" if arch in _WHY_NOT else ""
                raise ValueError(f"{where}: architectures {arch!r} is not supported{why}; supported: "
                                 f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    model_type = data.get("model_type")
    if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
        why = f" ({_WHY_NOT[model_type]})" if isinstance(model_type, str) and model_type in _WHY_NOT else ""
        raise ValueError(f"{where}: model_type {_show(model_type)} is not supported{why}; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")


def _check_layers(data: Mapping[str, Any], where: str) -> None:
    """Fields that would change a layer's computation: only Llama's own values pass."""
    act = data.get("hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"{where}: hidden_act {_show(act)} is not implemented; supported: "
                         f"{', '.join(SUPPORTED_ACTIVATIONS)}")
    for field, part in (("attention_bias", "q/k/v/o projections"), ("mlp_bias", "MLP projections")):
        value = data.get(field)
        if value not in (None, False):
            raise ValueError(f"{where}: {field} = {_show(value)} (biases on the {part}) is not implemented; "
                             "supported: false")
    tp = data.get("pretraining_tp")
    if tp not in (None, 1) or isinstance(tp, bool):
        raise ValueError(f"{where}: pretraining_tp = {_show(tp)} is not supported; supported: 1")
    window = data.get("sliding_window")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise ValueError(f"{where}: sliding_window = {_show(window)} is not a positive integer or null")


def _optional_number(value: Any, field: str, where: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{where}: {field} = {_show(value)} is not a number")
    return float(value)


def _flag(data: Mapping[str, Any], field: str, where: str) -> bool:
    value = data.get(field, False)
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {field} = {_show(value)} is not true or false")
    return value


def _rope_scaling(data: Mapping[str, Any], where: str) -> tuple[str, dict[str, float | int]]:
    """The rope type and its parameters, from ``rope_scaling`` (transformers 4.x) or
    ``rope_parameters`` (5.x); a type or key this runtime does not compute is refused."""
    found: dict[str, tuple[str, dict[str, float | int]]] = {}
    for field in ("rope_scaling", "rope_parameters"):
        spec = data.get(field)
        if spec is None:
            continue
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: {field} = {_show(spec)} is not an object")
        kinds = {key: spec[key] for key in _ROPE_TYPE_KEYS if key in spec}
        if len(set(map(str, kinds.values()))) > 1:
            raise ValueError(f"{where}: {field}.rope_type and {field}.type disagree ({_show(kinds)})")
        if not kinds and field == "rope_scaling":
            raise ValueError(f"{where}: rope_scaling = {_show(spec)} names no rope type; supported: "
                             f"{', '.join(SUPPORTED_ROPE_TYPES)}")
        key, kind = next(iter(kinds.items())) if kinds else ("rope_type", "default")
        if kind not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"{where}: rope scaling {_show(kind)} ({field}.{key}) is not implemented; supported: "
                             f"{', '.join(SUPPORTED_ROPE_TYPES)}")
        takes = ROPE_PARAMETERS[kind]
        allowed = {*_ROPE_TYPE_KEYS, *takes} | ({"rope_theta"} if field == "rope_parameters" else set())
        extra = sorted(k for k in spec if k not in allowed)
        if extra:
            raise ValueError(f"{where}: {field}.{extra[0]} = {_show(spec[extra[0]])} is not implemented for rope "
                             f"type {kind!r}; supported: {', '.join(sorted(allowed))}")
        params = {p: _rope_parameter(spec[p], p) for p in takes if spec.get(p) is not None}
        problem = rope_problem(kind, params)
        if problem:
            raise ValueError(f"{where}: {field}.{problem}")
        found[field] = (kind, params)
    if len(found) == 2 and found["rope_scaling"] != found["rope_parameters"]:
        raise ValueError(f"{where}: rope_scaling = {_show(data['rope_scaling'])} and rope_parameters = "
                         f"{_show(data['rope_parameters'])} disagree")
    return found.get("rope_parameters") or found.get("rope_scaling") or ("default", {})


def _rope_parameter(value: Any, key: str) -> Any:
    """One kind of number per parameter (8 and 8.0 alike), so that equal configs give equal
    kernel attributes; anything else is left for ``rope_problem`` to name."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if key == "original_max_position_embeddings":
        return int(value) if float(value).is_integer() else value
    return float(value)


def _rope_theta(data: Mapping[str, Any], where: str) -> float:
    """The rotary base, from ``rope_theta`` (transformers 4.x) or ``rope_parameters.rope_theta`` (5.x)."""
    params = data.get("rope_parameters")
    top = _optional_number(data.get("rope_theta"), "rope_theta", where)
    nested = (_optional_number(params.get("rope_theta"), "rope_parameters.rope_theta", where)
              if isinstance(params, dict) else None)
    if top is not None and nested is not None and top != nested:
        raise ValueError(f"{where}: rope_theta = {top:g} and rope_parameters.rope_theta = {nested:g} disagree")
    theta = nested if nested is not None else top
    return 10000.0 if theta is None else theta


def _preset(name: str, **fields: Any) -> ModelConfig:
    return ModelConfig(name=name, **fields)


PRESETS: dict[str, ModelConfig] = {
    "llama-2-7b": _preset("llama-2-7b", hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                          num_key_value_heads=32, head_dim=128, num_hidden_layers=32, vocab_size=32000,
                          rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama-3-8b": _preset("llama-3-8b", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=128, num_hidden_layers=32, vocab_size=128256,
                          rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192),
    "llama-3.1-8b": _preset("llama-3.1-8b", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=128, num_hidden_layers=32, vocab_size=128256,
                            rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                            rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                            rope_high_freq_factor=4.0, rope_original_max_position_embeddings=8192),
    "mistral-7b": _preset("mistral-7b", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=128, num_hidden_layers=32, vocab_size=32000,
                          rms_norm_eps=1e-5, rope_theta=1000000.0, max_position_embeddings=32768),
    # small enough to tune and run in seconds; dims are multiples of 128 so q4 (group 128) applies
    "tiny": _preset("tiny", hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=32, num_hidden_layers=2, vocab_size=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                    max_position_embeddings=1024),
}


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """A preset by name, or a Hugging Face ``config.json`` (a file, or a directory holding one).

    Raises ValueError with a readable message for an unknown name, an unreadable file, or a
    field this runtime does not implement (the line begins with the file's path)."""
    text = str(name_or_path)
    if text in PRESETS:
        return PRESETS[text]
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"unknown model {text!r}: not a preset ({', '.join(PRESETS)}) nor a config.json")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read model config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"model config {path}: expected a JSON object")
    name = data.get("_name_or_path") or path.parent.name or path.stem
    try:
        return ModelConfig.from_hf_dict(data, name=str(name), source=str(path))
    except TypeError as exc:
        raise ValueError(f"model config {path}: {exc}") from None

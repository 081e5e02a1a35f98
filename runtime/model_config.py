"""Llama-style model configurations: Hugging Face ``config.json`` files and shipped presets.

Only the fields a decoder needs are read; ``head_dim`` defaults to hidden / heads and
``num_key_value_heads`` to the number of heads (multi-head attention), as in transformers.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping


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

    def to_hf_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("name")
        data.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu")
        return data

    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any], name: str = "model") -> "ModelConfig":
        missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                               "vocab_size") if k not in data]
        if missing:
            raise ValueError(f"model config {name}: missing {', '.join(missing)}")
        heads = data["num_attention_heads"]
        head_dim = data.get("head_dim") or (data["hidden_size"] // heads if heads else 0)
        return cls(name=name, hidden_size=data["hidden_size"], intermediate_size=data["intermediate_size"],
                   num_attention_heads=heads, num_key_value_heads=data.get("num_key_value_heads") or heads,
                   head_dim=head_dim, num_hidden_layers=data["num_hidden_layers"], vocab_size=data["vocab_size"],
                   rms_norm_eps=float(data.get("rms_norm_eps", 1e-5)),
                   rope_theta=float(data.get("rope_theta", 10000.0)),
                   tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
                   max_position_embeddings=int(data.get("max_position_embeddings", 4096)))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")


def _preset(name: str, **fields: Any) -> ModelConfig:
    return ModelConfig(name=name, **fields)


PRESETS: dict[str, ModelConfig] = {
    "llama-2-7b": _preset("llama-2-7b", hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                          num_key_value_heads=32, head_dim=128, num_hidden_layers=32, vocab_size=32000,
                          rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama-3-8b": _preset("llama-3-8b", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=128, num_hidden_layers=32, vocab_size=128256,
                          rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192),
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

    Raises ValueError with a readable message for an unknown name or an unreadable file."""
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
        return ModelConfig.from_hf_dict(data, name=str(name))
    except TypeError as exc:
        raise ValueError(f"model config {path}: {exc}") from None

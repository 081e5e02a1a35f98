"""What a greedy generation returns: the tokens, the logits of every step, and its speed; and
the checks of what a generation (or a pass over a prompt) is given."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .model_config import ModelConfig


def checked_tokens(config: ModelConfig, ids, scales_queries: bool = False) -> np.ndarray:
    """``ids`` [B, T] as int64 once they are token ids of ``config``'s vocabulary (ValueError
    otherwise: numpy would take -1 for the last word of the table); ``scales_queries``: as
    ``check_positions`` takes it."""
    given = np.asarray(ids)
    if given.dtype.kind not in "iu":  # 1.7 is no token id, nor is True or "3"
        raise ValueError(f"prompts must be integer token ids, not {given.dtype}")
    if given.ndim != 2 or given.shape[0] < 1 or given.shape[1] < 1:
        raise ValueError(f"prompts must be [batch, tokens] with batch and tokens >= 1, not of shape {given.shape}")
    if given.min() < 0 or given.max() >= config.vocab_size:
        raise ValueError(f"token ids must lie in 0..{config.vocab_size - 1}")
    check_positions(config, given.shape[1], scales_queries)
    return given.astype(np.int64)


def check_positions(config: ModelConfig, positions: int, scales_queries: bool = False) -> None:
    """ValueError where a sequence of ``positions`` positions passes ``config.position_limit`` on
    kernels that do not scale queries by position (``scales_queries`` false: the CUDA ones)."""
    limit = config.position_limit
    if limit is not None and positions > limit and not scales_queries:
        raise ValueError(f"{config.name} scales its queries by position past its first {limit} positions "
                         f"(rope_parameters.llama_4_scaling_beta, Ministral 3's), which the CUDA kernels do not "
                         f"implement (the CPU runtime does): this sequence takes {positions} positions")


def checked_generation(config: ModelConfig, prompts, new_tokens, scales_queries: bool = False) -> tuple[np.ndarray, int]:
    """The prompts (``checked_tokens``) and ``new_tokens`` of a greedy generation, checked before
    any work; ``scales_queries``: as ``check_positions`` takes it."""
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, (int, np.integer)) or new_tokens < 1:
        raise ValueError(f"new_tokens must be an int >= 1, not {new_tokens!r}")
    prompts = checked_tokens(config, prompts, scales_queries)
    # the last new token is never fed back
    check_positions(config, prompts.shape[1] + new_tokens - 1, scales_queries)
    return prompts, int(new_tokens)


@dataclass
class Generation:
    tokens: np.ndarray      # [B, new_tokens] generated ids
    logits: np.ndarray | None  # [B, new_tokens, vocab]: step 0 from the prefill, then one per decode
    #                            step; None when the generation was asked not to keep them
    prefill_s: float
    decode_s: float
    prefill_tokens: int     # prompt tokens processed (all sequences)
    decode_tokens: int      # tokens produced by decode steps (all sequences)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

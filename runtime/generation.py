"""What a greedy generation returns: the tokens, the logits of every step, and its speed."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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

"""How a generation picks each next token: greedily or by sampling, and where it ends.

Sampling follows transformers' ``generate(do_sample=True)``: the logits divided by the
temperature, then cut to the ``top_k`` largest, then to the smallest set of the most likely
tokens whose probabilities sum to at least ``top_p`` (the token that crosses it kept), then one
draw from the softmax of what is left. The draws come from numpy's generator seeded by
``Sampling.seed``, so a generation is repeatable, but not transformers' (torch draws its own).

A sequence ends at the first of ``stop_ids`` it generates; from then on it is fed, and given,
``pad_id`` (transformers' padding of finished sequences), and a generation ends once every
sequence has.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# top-p first looks among this many of the most likely tokens (a partition, not a sort of the
# vocabulary); where they hold less than top_p of the mass it sorts them all
_TOP_P_CANDIDATES = 1024


@dataclass(frozen=True)
class Sampling:
    """Sampling's settings; ``top_k`` 0 and ``top_p`` 1.0 leave every token in."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be a number > 0, not {t!r} (greedy decoding: no sampling)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: every token), not {self.top_k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1] (1: every token), not {p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, not {self.seed!r}")

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """[B, V] float64: each row's distribution the draw is from (zero where cut)."""
        scores = np.asarray(logits, dtype=np.float64) / self.temperature
        vocab = scores.shape[-1]
        if 0 < self.top_k < vocab:
            # as transformers: every score below the k-th largest goes (ties with it stay)
            kth = np.partition(scores, vocab - self.top_k, axis=-1)[:, vocab - self.top_k]
            scores = np.where(scores < kth[:, None], -np.inf, scores)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        if self.top_p < 1:
            probs = np.stack([self._nucleus(row) for row in probs])
            probs /= probs.sum(axis=-1, keepdims=True)
        return probs

    def _nucleus(self, probs: np.ndarray) -> np.ndarray:
        """``probs`` with every token cut whose more likely tokens hold top_p of the mass already."""
        vocab = probs.shape[0]
        candidates = np.arange(vocab)
        if vocab > _TOP_P_CANDIDATES:
            top = np.argpartition(probs, vocab - _TOP_P_CANDIDATES)[vocab - _TOP_P_CANDIDATES:]
            if probs[top].sum() >= self.top_p:  # the nucleus lies among them
                candidates = np.sort(top)
        # most likely first; of equal ones the later id first, as transformers' ascending sort has them
        order = candidates[np.argsort(probs[candidates], kind="stable")[::-1]]
        before = np.cumsum(probs[order]) - probs[order]  # the mass of the tokens more likely than each
        kept = np.zeros_like(probs)
        keep = order[before < self.top_p]
        kept[keep] = probs[keep]
        return kept


class NextTokens:
    """The tokens a generation of ``batch`` sequences feeds back, step by step: the model's most
    likely ones, or drawn by ``sampling``; each sequence padded from its first stop id on."""

    def __init__(self, batch: int, sampling: Sampling | None = None, stop_ids=(), pad_id: int | None = None,
                 vocab: int | None = None):
        self.sampling = sampling
        self.stop_ids = _token_ids(stop_ids, "stop_ids", vocab)
        if pad_id is None:
            pad_id = self.stop_ids[0] if self.stop_ids else 0
        self.pad_id = _token_ids([pad_id], "pad_id", vocab)[0]
        self.rng = np.random.default_rng(sampling.seed) if sampling is not None else None
        self.ended = np.zeros(batch, dtype=bool)
        self.all_ended = False  # a plain bool: a decode loop reads it every step

    @property
    def needs_logits(self) -> bool:
        """Whether a step must hand over its logits (a draw needs them; greedy needs its ids only)."""
        return self.sampling is not None


    def __call__(self, logits: np.ndarray | None, most_likely: np.ndarray | None = None) -> np.ndarray:
        """The next ids [B] (int64) after a step's ``logits`` [B, V]; ``most_likely``: their argmax
        where the step computed it already (on the device)."""
        if self.sampling is None:
            ids = most_likely if most_likely is not None else logits.argmax(axis=-1)
            if not self.stop_ids:
                return ids  # plain greedy decoding: nothing to add to a step (the tiny model's is ~50 us)
        else:
            probs = self.sampling.probabilities(logits)
            draws = self.rng.random(probs.shape[0])
            # the first token whose cumulative probability passes the draw: a cut token adds
            # nothing to it, so is never the first (the last kept one where rounding runs past)
            cumulative = np.cumsum(probs, axis=-1)
            ids = np.array([np.searchsorted(row, u * row[-1], side="right") for row, u in zip(cumulative, draws)])
            last_kept = probs.shape[-1] - 1 - (probs[:, ::-1] > 0).argmax(axis=-1)
            ids = np.minimum(ids, last_kept)
        ids = np.where(self.ended, self.pad_id, ids).astype(np.int64)
        if self.stop_ids:
            self.ended |= np.isin(ids, self.stop_ids)
            self.all_ended = bool(self.ended.all())
        return ids


def _token_ids(values, name: str, vocab: int | None) -> tuple[int, ...]:
    """``values`` as a tuple of distinct token ids in their order, checked against ``vocab``."""
    out: list[int] = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0 or (
                vocab is not None and value >= vocab):
            limit = f" in 0..{vocab - 1}" if vocab is not None else " >= 0"
            raise ValueError(f"{name} must be token ids{limit}, not {value!r}")
        if int(value) not in out:
            out.append(int(value))
    return tuple(out)

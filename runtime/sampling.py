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

    def kept(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tokens a draw from one row of ``logits`` [V] may pick, by ascending id, and their
        probabilities (summing to 1). Whole-vocabulary work is a few passes (a partition, not a
        sort: 128k logits cost about a millisecond); only the kept tokens are sorted."""
        scores = np.asarray(logits, dtype=np.float64) / self.temperature
        vocab = scores.shape[0]
        ids = None
        if 0 < self.top_k < vocab:
            # as transformers: every score below the k-th largest goes (ties with it stay)
            kth = np.partition(scores, vocab - self.top_k)[vocab - self.top_k]
            ids = np.flatnonzero(scores >= kth)
            scores = scores[ids]
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        if self.top_p < 1:
            nucleus = self._nucleus(probs)
            ids = nucleus if ids is None else ids[nucleus]
            probs = probs[nucleus] / probs[nucleus].sum()
        return (np.arange(vocab) if ids is None else ids), probs

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """[B, V] float64: each row's distribution the draw is from (zero where cut)."""
        rows = np.atleast_2d(np.asarray(logits))
        out = np.zeros(rows.shape, np.float64)
        for out_row, row in zip(out, rows):
            ids, probs = self.kept(row)
            out_row[ids] = probs
        return out

    def _nucleus(self, probs: np.ndarray) -> np.ndarray:
        """The indices (ascending) of ``probs`` kept by top_p: each token whose more likely tokens
        hold less than top_p of the mass. Looked for among the most likely 1024, then 8x as many,
        before the whole row is sorted."""
        n = probs.shape[0]
        candidates = np.arange(n)
        size = _TOP_P_CANDIDATES
        while size < n:
            top = np.argpartition(probs, n - size)[n - size:]
            if probs[top].sum() >= self.top_p:  # the nucleus lies among them
                candidates = np.sort(top)
                break
            size *= 8
        # most likely first; of equal ones the later id first, as transformers' ascending sort has them
        order = candidates[np.argsort(probs[candidates], kind="stable")[::-1]]
        before = np.cumsum(probs[order]) - probs[order]  # the mass of the tokens more likely than each
        return np.sort(order[before < self.top_p])


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
            ids = np.empty(len(logits), np.int64)
            for b, (row, draw) in enumerate(zip(logits, self.rng.random(len(logits)))):
                kept, probs = self.sampling.kept(row)
                # the first kept token (by id) whose cumulative probability passes the draw (the
                # last one where rounding runs past)
                cumulative = np.cumsum(probs)
                ids[b] = kept[min(np.searchsorted(cumulative, draw * cumulative[-1], side="right"), len(kept) - 1)]
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

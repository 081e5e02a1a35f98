"""``geglu`` on the CPU: Y = gelu(G) * U, gelu in the tanh approximation (Gemma's gated MLP).

gelu is gelu's own code (``gelu.gelu_tanh``) with the same ``form`` and ``division`` knobs:
the ``sigmoid`` form has no cancellation, and for very negative G exp(-2u) is clamped to
exp(88) = 1.7e38, so the quotient G / 1.7e38 goes to the correct limit 0 (within 6e-39 |G|,
as in swiglu); the ``tanh`` form gives 0 there exactly (0.5 G tanh(u) + 0.5 G, one fma).
"""
from __future__ import annotations

from ..ops.elementwise import GegluOp
from ..template import register_template
from .gelu import GeluKnobsCpu, gelu_tanh


@register_template
class GegluCpu(GegluOp, GeluKnobsCpu):
    def emit_vector(self, kb, c, values):
        return {"Y": kb.fmul(gelu_tanh(kb, c, values["G"]), values["U"])}

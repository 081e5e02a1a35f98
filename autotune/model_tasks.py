"""A model as tuning tasks: the distinct kernels of its prefill and decode passes.

The passes come from ``runtime.plan`` (the kernels the runtime's decoder calls). A task's
``weight`` is how often it runs in the workload the scheduler minimises: each prefill size
once (one prompt) and, for every decode batch, ``decode_steps`` decode steps spread evenly
over the KV lengths. Its share of end-to-end latency is the weight times its best
measured time (the scheduler measures every task's template default first).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from runtime.abi import KernelSpec
from runtime.model_config import ModelConfig
from runtime.plan import decode_calls, prefill_calls
from runtime.precision import ITEMSIZE
from search_space import Task

DECODE_STEPS = 128  # tokens generated per prompt in the workload a model job tunes for


@dataclass
class ModelTask:
    task: Task
    weight: float                                        # runs per workload
    uses: dict[str, int] = field(default_factory=dict)   # pass name -> calls per pass

    @property
    def key(self) -> str:
        return self.task.key


def task_of(spec: KernelSpec) -> Task:
    return Task.make(spec.op, spec.dims, spec.dtype, spec.attr, spec.dynamic)


def model_tasks(config: ModelConfig, prefill_tokens: list[int], decode_batch: list[int], kv_len: list[int],
                quantize: str = "none", group_size: int = 128,
                decode_steps: int = DECODE_STEPS, dtype: str = "float32", resident: bool = False,
                weights: str | None = None, dynamic_rows: bool = False) -> list[ModelTask]:
    """The distinct tasks of every pass, by op; raises ValueError for a bad setting. ``dtype``,
    ``weights`` and ``dynamic_rows`` as ``runtime.plan`` takes them (``precisions`` maps a
    model's precision on a target to the first two, ``PREFILL_DYNAMIC_ROWS`` a target to the last)."""
    passes: list[tuple[str, float, list]] = []
    # past longrope's original context a pass rotates by long_factor (ModelConfig.rope_is_long): a
    # prompt of T tokens, and a decode step at KV length L, run L positions
    for tokens in prefill_tokens:
        passes.append((f"prefill T={tokens}", 1.0, prefill_calls(config, tokens, quantize, group_size, dtype=dtype,
                                                                     weights=weights, dynamic_rows=dynamic_rows,
                                                                     long_rope=config.rope_is_long(tokens))))
    for batch in decode_batch:
        for length in kv_len:
            passes.append((f"decode B={batch} L={length}", decode_steps / len(kv_len),
                           decode_calls(config, batch, length, quantize, group_size, dtype, resident, weights,
                                        long_rope=config.rope_is_long(length))))
    tasks: dict[str, ModelTask] = {}
    for name, runs, calls in passes:
        for call in calls:
            task = task_of(call.spec)
            entry = tasks.setdefault(task.key, ModelTask(task, 0.0))
            entry.weight += runs * call.count
            entry.uses[name] = entry.uses.get(name, 0) + call.count
    return sorted(tasks.values(), key=lambda t: (t.task.op, t.key))


# ----------------------------------------------------------------------------- bytes a pass touches


def weight_bytes(config: ModelConfig, quantize: str = "none", group_size: int = 128, dtype: str = "float32",
                 weights: str | None = None) -> int:
    """Bytes of the weights one forward pass reads in precision ``dtype``: every linear layer
    (the LM head included; int4 codes and a scale per ``group_size`` weights with q4, and a zero
    point where an int4 checkpoint's codes have them, whose LM head stays in floats; in
    ``weights`` when given: weight-only), the norm gains (Qwen3's of the query and key heads
    too) and the projection biases. The
    embedding table is only gathered from, a row per token, so a tied one counts once, as the
    LM head. A mixture of experts' MLP counts the router, the experts one token runs
    (``experts_per_token``) and Qwen2-MoE's shared expert: what a decode step of one sequence reads."""
    c = config
    h, layers = c.hidden_size, c.num_hidden_layers
    mlp = (layers - c.moe_layers) * 3 * h * c.dense_size
    if c.moe:  # a layer of experts: the router, the experts one token runs, the shared expert and its gate
        shared = c.shared_expert_intermediate_size
        mlp += c.moe_layers * (3 * h * c.intermediate_size * c.experts_per_token + h * c.num_experts
                               + (3 * h * shared + h if shared else 0))
    linear = layers * (h * (c.q_size + 2 * c.kv_size) + c.q_size * h) + mlp
    head = c.vocab_size * h
    size = ITEMSIZE[dtype]
    float_weight = ITEMSIZE[weights or dtype]
    if quantize == "q4":
        per_weight = 0.5 + size * (1 + c.int4_zero_points) / group_size
        head_bytes = head * (float_weight if c.int4_format is not None else per_weight)
    else:
        per_weight, head_bytes = float_weight, head * float_weight
    biases = layers * ((c.q_size + 2 * c.kv_size) * c.qkv_bias + h * c.o_bias
                       + (2 * c.intermediate_size + h) * c.mlp_bias)
    gains = (2 * layers + 1) * h + 2 * layers * c.head_dim * c.qk_norm
    return int(linear * per_weight + head_bytes) + size * (gains + biases)


def pass_bytes(config: ModelConfig, rows: int, sequences: int, positions: int, quantize: str = "none",
               group_size: int = 128, dtype: str = "float32", weights: str | None = None) -> int:
    """Bytes one forward pass over ``rows`` token rows of ``sequences`` sequences touches: the
    weights, the activations (``runtime.llama``'s buffers, the logits) and a KV cache of
    ``positions`` positions per sequence."""
    c = config
    width = 5 * c.hidden_size + 3 * c.q_size + 3 * c.kv_size + 3 * c.intermediate_size
    size = ITEMSIZE[dtype]
    activations = size * (rows * width + sequences * (c.vocab_size + c.hidden_size))
    cache = size * 2 * c.num_hidden_layers * sequences * c.kv_size * positions
    return weight_bytes(config, quantize, group_size, dtype, weights) + activations + cache


def workload_bytes(config: ModelConfig, prefill_tokens: list[int], decode_batch: list[int], kv_len: list[int],
                   quantize: str = "none", group_size: int = 128, dtype: str = "float32",
                   weights: str | None = None) -> int:
    """The most bytes any one pass of the workload touches (each prefill size with its prompt in
    the cache; each decode batch at each KV length): what must stay in cache from one pass to
    the next for a kernel to find its weights there."""
    passes = [(tokens, 1, tokens) for tokens in prefill_tokens]
    passes += [(batch, batch, length) for batch in decode_batch for length in kv_len]
    return max(pass_bytes(config, rows, sequences, positions, quantize, group_size, dtype, weights)
               for rows, sequences, positions in passes)

"""A large model on the GPU, end to end: tuned kernels against the bandwidth floor and plain torch.

    python benchmarks/gpu_model.py --model llama-2-7b --dtype float16 [--quantize q4] --log tuned.jsonl

Weights are generated on the device with torch (no host copy of a 7B model) and handed to the
runtime as ``runtime.weights.DeviceWeights``, which uses them where they lie. The kernels come
from the tuning log (``autotune tune-model --target cuda``), shapes it lacks at template
defaults. Reported, in one JSON line and a short table:

- decode and prefill tokens/s of the runtime (batch 1, ``--prompt`` tokens, ``--new`` new);
- the bandwidth floor: (weight bytes + KV bytes at the mean cache length) per decode token over
  the streaming rate measured here with a device-to-device copy, and the share of it reached;
- the same model in plain torch eager (F.linear with Q/K/V and gate/up fused as the runtime
  runs them, SDPA, a static KV cache) on the same weights, and the ratio;
- the largest logit difference of the runtime against that torch model in float32 on the same
  (rounded, dequantised) weights, teacher-forced over the runtime's tokens;
- where a decode step's time goes, from a timed run under torch's profiler: each kernel's
  device time per step and share of the step, and the share spent in no kernel;
- the programmatic edges in the captured step (``runtime.cuda_graph``) and decode tokens/s of
  the same step captured without them.

torch is a baseline here, not a dependency of the project. It initialises CUDA first; the
runtime then attaches pycuda to the device's primary context (one context for both).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# "cpu" rehearses the whole script here: torch on the CPU, the runtime on the fake pycuda of the
# tests (whose device pointers are host addresses), on a small config
DEVICE = os.environ.get("GPU_MODEL_DEVICE", "cuda")


def generate_weights(torch, config, dtype: str, quantize: str, group_size: int, seed: int):
    """name -> torch tensor on the device in the model's precision, named as the decoder reads
    them (``runtime.weights.device_shapes``: Q/K/V and gate/up stacked; int4 layers as NAME#wq
    and NAME#scales, and NAME#zeros where the config's codes have zero points, as an AWQ
    checkpoint's do), plus for int4 layers the float32 weights their codes stand for."""
    from runtime.weights import device_shapes, expected_shapes, fused_parts, q4_linear_names

    tdtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    parts = {}
    for name, shape in expected_shapes(config).items():
        if len(shape) == 1:
            w = torch.rand(shape, generator=gen, device=DEVICE, dtype=torch.float32) * 0.4 + 0.8
        else:
            w = torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.float32) * 0.02
        parts[name] = w.to(tdtype)
    stored = {"model.embed_tokens.weight": parts["model.embed_tokens.weight"]}  # gathered on the host
    for name in device_shapes(config):
        pieces = [parts.pop(p) if p != "model.embed_tokens.weight" else parts[p] for p in fused_parts(name)]
        stored[name] = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    full = {}
    # act-order (``ModelConfig.int4_act_order``): each int4 layer's input columns in a random order,
    # its codes stored in that order (grouped as GPTQ's sorted g_idx groups them) and, but down_proj's,
    # the order as NAME#order; torch multiplies with the weights in the input's own order
    orders = {name: torch.randperm(stored[name].shape[1], generator=gen, device=DEVICE)
              for name in (q4_linear_names(config, device=True) if quantize == "q4" and config.int4_act_order else ())}
    for name in (q4_linear_names(config, device=True) if quantize == "q4" else ()):
        w = stored[name]
        if name in orders:
            w = w[:, orders[name]]
        n, k = w.shape
        groups = w.float().reshape(n, k // group_size, group_size)
        if config.int4_zero_points:  # asymmetric: each group's range in 16 steps from its zero point
            lo, hi = groups.amin(dim=2), groups.amax(dim=2)
            scales = ((hi - lo).clamp_min(1e-8) / 15.0).to(tdtype)
            zeros = torch.round(-lo / scales.float()).clamp(0, 15)
            stored[f"{name}#zeros"] = zeros.to(tdtype).contiguous()
        else:
            scales = (groups.abs().amax(dim=2).clamp_min(1e-8) / 7.0).to(tdtype)
            zeros = torch.full_like(scales, 8, dtype=torch.float32)
        codes = (torch.round(groups / scales.float()[..., None]) + zeros[..., None]).clamp(0, 15)
        codes = codes.to(torch.uint8).reshape(n, k)
        stored[f"{name}#wq"] = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
        stored[f"{name}#scales"] = scales.contiguous()
        full[name] = ((codes.float().reshape(n, -1, group_size) - zeros[..., None])
                      * scales.float()[..., None]).reshape(n, k)
        if name in orders:
            full[name] = full[name][:, torch.argsort(orders[name])]  # back in the input's order
            if not name.endswith("down_proj.weight"):
                stored[f"{name}#order"] = orders[name].to(torch.int32)
        if name != "model.embed_tokens.weight":
            del stored[name]  # only the codes live on: a 7B model in fp16 and int4 would not fit twice
    for name in [n for n in orders if n.endswith("mlp.gate_up_proj.weight")]:
        # gate's and up's rows in the order down_proj reads its input, as the runtime uploads them
        down = orders[name.replace("gate_up_proj", "down_proj")]
        for part in ("wq", "scales", "zeros"):
            if f"{name}#{part}" in stored:
                gate, up = stored[f"{name}#{part}"].chunk(2)
                stored[f"{name}#{part}"] = torch.cat([gate[down], up[down]]).contiguous()
    return stored, full


def device_weights(torch, config, stored, dtype: str, quantize: str, group_size: int):
    from runtime.arrays import DeviceArray
    from runtime.kernel import numpy_dtype
    from runtime.weights import DeviceWeights, q4_linear_names

    def as_array(t):
        np_dtype = {torch.uint8: np.uint8, torch.int32: np.int32}.get(t.dtype, numpy_dtype(dtype))
        return DeviceArray(t.data_ptr(), tuple(t.shape), np_dtype)

    embed = stored["model.embed_tokens.weight"]
    if config.embedding_multiplier != 1:  # the gathered table carries the scale (Granite's, Gemma's)
        embed = embed * torch.tensor(config.embedding_multiplier, dtype=embed.dtype)
    host = embed.view(torch.int16).cpu().numpy().view(np.uint16) if dtype == "bfloat16" else embed.cpu().numpy()
    quantized = frozenset(q4_linear_names(config, device=True) if quantize == "q4" else ())
    # generated weights are taken as already folded (runtime.weights.DeviceWeights): the baseline
    # then runs them without the scalars folded into weights (``baseline_config``)
    return DeviceWeights(config, {n: as_array(t) for n, t in stored.items()}, host, quantized, group_size,
                         folded=config.scaled)


def baseline_config(config):
    """The config the torch baseline runs the generated weights with: what the runtime folds into
    uploaded weights (norm gains of 1 + weight, the residual and logit scalars) already in them,
    as ``device_weights`` hands them over; the embedding scale stays (the baseline gathers from
    the unscaled table, which is also a tied LM head)."""
    import dataclasses

    return dataclasses.replace(config, offset_norms=False, residual_multiplier=1.0, logits_scaling=1.0)


class TorchLlama:
    """The same decoder in plain torch eager: what a user without a compiler runs."""

    def __init__(self, torch, config, weight, dtype):
        from runtime.rope_frequencies import inverse_frequencies, rotation_scale_of

        self.torch, self.c, self.weight, self.dtype = torch, config, weight, dtype
        # over the rotary dims: the first c.rotary_dim of a head (partial rotary), all of it elsewhere
        freqs = inverse_frequencies(config.rotary_dim, config.rope_theta, config.rope_type, **config.rope_scaling)
        self.freqs = torch.tensor(freqs, dtype=torch.float64, device=DEVICE)
        local = inverse_frequencies(config.head_dim, config.local_rope_theta) if config.local_layers else freqs
        self.local_freqs = torch.tensor(local, dtype=torch.float64, device=DEVICE)  # Gemma 3's sliding layers'
        self.scale = rotation_scale_of(config.rope_type, config.rope_scaling)  # yarn's attention factor: cos, sin

    def _rope(self, x, positions, layer):
        torch, c = self.torch, self.c
        if layer in c.nope_layers:  # SmolLM3: no rotation
            return x
        local = layer in c.local_layers
        freqs = self.local_freqs if local else self.freqs
        scale = 1.0 if local else self.scale
        angle = positions.to(torch.float64)[:, None] * freqs[None, :]
        cos, sin = (angle.cos() * scale).to(x.dtype)[:, None, :], (angle.sin() * scale).to(x.dtype)[:, None, :]
        half = freqs.shape[0]  # partial rotary: dims 2 half .. D - 1 pass through
        lo, hi, passed = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
        return torch.cat([lo * cos - hi * sin, hi * cos + lo * sin, passed], dim=-1)

    def _norm(self, x, name):
        torch = self.torch
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.c.rms_norm_eps)
        if self.c.offset_norms:  # Gemma: by 1 + weight, in float32 (transformers' Gemma RMSNorm)
            return (normed * (1.0 + self.weight(name).float())).to(x.dtype)
        return normed.to(x.dtype) * self.weight(name)

    def _attend(self, q, k, v, start, layer):
        """Attention of q [T, H, D] at start.. over the cached k, v [1, HKV, L, D]: SDPA, or by
        hand where Gemma 2 soft-caps the scores; a sliding window as a mask."""
        torch, c = self.torch, self.c
        t, length = q.shape[0], k.shape[2]
        window = c.layer_window(layer)
        mask = None
        if t > 1 or (window and length > window):
            keys = torch.arange(length, device=DEVICE)[None, :]
            queries = torch.arange(start, start + t, device=DEVICE)[:, None]
            mask = (keys <= queries) & ((keys > queries - window) if window else True)
        qh = q.transpose(0, 1)[None]
        if not c.attn_softcap:
            return torch.nn.functional.scaled_dot_product_attention(qh, k, v, attn_mask=mask, enable_gqa=True,
                                                                    scale=c.attention_scale)
        group = c.num_attention_heads // c.num_key_value_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = (qh @ k.transpose(-1, -2)).float() * c.attention_scale
        scores = c.attn_softcap * torch.tanh(scores / c.attn_softcap)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(-1).to(v.dtype) @ v

    def new_cache(self, capacity):
        c, torch = self.c, self.torch
        return [(torch.zeros(1, c.num_key_value_heads, capacity, c.head_dim, dtype=self.dtype, device=DEVICE),
                 torch.zeros(1, c.num_key_value_heads, capacity, c.head_dim, dtype=self.dtype, device=DEVICE))
                for _ in range(c.num_hidden_layers)]

    def forward(self, ids, start, cache):
        """Logits [T, V] of ids [T] at positions start.. (the cache filled as it goes)."""
        torch, c, w = self.torch, self.c, self.weight
        F = torch.nn.functional
        t = ids.shape[0]
        positions = torch.arange(start, start + t, device=DEVICE)
        # Granite's scalars (1 for the other families): here, after each sublayer, and on the logits;
        # Gemma's embedding scale in the model's precision, as transformers multiplies by it
        x = F.embedding(ids, w("model.embed_tokens.weight"))
        x = x * torch.tensor(c.embedding_multiplier, dtype=x.dtype) if c.embedding_multiplier != 1 else x
        for layer in range(c.num_hidden_layers):
            p = f"model.layers.{layer}."
            h = self._norm(x, p + "input_layernorm.weight") if c.pre_norms else x  # OLMo 2: no input norm
            q, k, v = F.linear(h, w(p + "self_attn.qkv_proj.weight")).split([c.q_size, c.kv_size, c.kv_size], -1)
            if c.qk_norm and c.qk_norm_span == "projection":  # OLMo 2: the whole q and k projections
                q, k = self._norm(q, p + "self_attn.q_norm.weight"), self._norm(k, p + "self_attn.k_norm.weight")
            q = q.reshape(t, c.num_attention_heads, c.head_dim)
            k = k.reshape(t, c.num_key_value_heads, c.head_dim)
            v = v.reshape(t, c.num_key_value_heads, c.head_dim)
            if c.qk_norm and c.qk_norm_span == "head":  # Qwen3: each query and key head normalised before the rotation
                q, k = self._norm(q, p + "self_attn.q_norm.weight"), self._norm(k, p + "self_attn.k_norm.weight")
            q, k = self._rope(q, positions, layer), self._rope(k, positions, layer)
            k_cache, v_cache = cache[layer]
            k_cache[0, :, start:start + t] = k.transpose(0, 1)
            v_cache[0, :, start:start + t] = v.transpose(0, 1)
            length = start + t
            o = self._attend(q, k_cache[:, :, :length], v_cache[:, :, :length], start, layer)
            attn = o[0].transpose(0, 1).reshape(t, -1)
            out = F.linear(attn, w(p + "self_attn.o_proj.weight"))
            if c.post_norms:  # Gemma 2 / 3, OLMo 2: each sublayer's output normalised before its residual add
                x = x + self._norm(out, p + "post_attention_layernorm.weight")
                h = self._norm(x, p + "pre_feedforward_layernorm.weight") if c.pre_norms else x
            else:
                x = x + out * c.residual_multiplier
                h = self._norm(x, p + "post_attention_layernorm.weight")
            gate, up = F.linear(h, w(p + "mlp.gate_up_proj.weight")).chunk(2, dim=-1)
            act = F.gelu(gate, approximate="tanh") if c.activation == "gelu_tanh" else F.silu(gate)
            out = F.linear(act * up, w(p + "mlp.down_proj.weight"))
            x = x + (self._norm(out, p + "post_feedforward_layernorm.weight") if c.post_norms
                     else out * c.residual_multiplier)
        head = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        logits = F.linear(self._norm(x, "model.norm.weight"), w(head))
        if c.final_softcap:  # Gemma 2
            logits = c.final_softcap * torch.tanh(logits / c.final_softcap)
        return logits / c.logits_scaling


def synchronize(torch) -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def streaming_rate(torch) -> float:
    """Bytes per second a device-to-device copy of 4 GiB moves (read plus write)."""
    x = torch.empty(1 << 31 if DEVICE == "cuda" else 1 << 24, dtype=torch.float16, device=DEVICE)
    y = torch.empty_like(x)
    y.copy_(x)
    synchronize(torch)
    best = float("inf")
    for _ in range(5):
        begin = time.perf_counter()
        y.copy_(x)
        synchronize(torch)
        best = min(best, time.perf_counter() - begin)
    return 2 * x.numel() * x.element_size() / best


def kernel_times(torch, run) -> dict[str, tuple[float, int]] | None:
    """{kernel name: (device seconds, launches)} of what ``run()`` puts on the GPU, from torch's
    profiler (CUPTI sees every kernel of the process, the runtime's graph replays included);
    None where the profiler records no kernel (no GPU, or no CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        synchronize(torch)
    times: dict[str, tuple[float, int]] = {}
    for event in prof.events():
        if str(getattr(event, "device_type", "")).split(".")[-1] != "CUDA":
            continue
        us = event.time_range.elapsed_us()  # a device event's own span: the kernel (or copy) itself
        seconds, count = times.get(event.name, (0.0, 0))
        times[event.name] = (seconds + us * 1e-6, count + 1)
    return times or None


def decode_profile(torch, model, prompts, steps: int, wall_per_step: float) -> dict | None:
    """Where a decode step's time goes, from a timed run: device time per step and share of the
    step's wall time of each kernel (by name: the four projections share ``gemv``), and the
    share in no kernel at all (launch gaps between the graph's kernels, host time). A prefill and
    ``steps`` decode steps minus a prefill alone, so only the decode steps count. Kernels joined
    by programmatic edges overlap (one starts while the one before it ends), so the shares may
    add up to more than the step."""
    try:
        both = kernel_times(torch, lambda: model.generate(prompts, steps + 1, keep_logits=False))
        alone = kernel_times(torch, lambda: model.generate(prompts, 1, keep_logits=False))
    except Exception as exc:  # a profiler that cannot run here must not cost the measured lines
        return {"error": f"{type(exc).__name__}: {exc}"}
    if both is None or alone is None:
        return None
    kernels = {}
    for name, (seconds, count) in both.items():
        seconds -= alone.get(name, (0.0, 0))[0]
        count -= alone.get(name, (0.0, 0))[1]
        if count > 0:
            kernels[name] = {"us_per_step": seconds / steps * 1e6, "launches_per_step": count / steps,
                             "share_of_step": seconds / steps / wall_per_step}
    busy = sum(k["share_of_step"] for k in kernels.values())
    return {"steps": steps, "wall_us_per_step": wall_per_step * 1e6, "in_kernels_share": busy,
            "launches_per_step": sum(k["launches_per_step"] for k in kernels.values()),
            "kernels": dict(sorted(kernels.items(), key=lambda kv: -kv[1]["us_per_step"]))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-2-7b")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--quantize", default="none", choices=["none", "q4"])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--log", action="append", default=[], help="tuning log(s); none: template defaults")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch  # first: it owns the primary context the runtime attaches to

    if DEVICE == "cuda":
        torch.cuda.init()
    from autotune.model_tasks import weight_bytes
    from export import TunedKernels
    from records import load_records
    from runtime.kernel import UntunedShapeWarning
    from runtime.llama import LlamaModel
    from runtime.model_config import load_model_config
    from search_space import Target

    warnings.simplefilter("ignore", UntunedShapeWarning)  # counted instead: kernels_tuned of kernels
    config = load_model_config(args.model)
    rate = streaming_rate(torch)
    stored, full = generate_weights(torch, config, args.dtype, args.quantize, args.group_size, args.seed)
    weights = device_weights(torch, config, stored, args.dtype, args.quantize, args.group_size)
    kernels = TunedKernels(load_records(args.log) if args.log else (), Target.cuda(0))
    model = LlamaModel(config, weights, kernels, dtype=args.dtype)
    prompts = np.random.default_rng(args.seed).integers(0, config.vocab_size, (1, args.prompt))
    model.prepare(1, args.prompt, args.new)
    model.generate(prompts, 2, keep_logits=False)  # warm-up: every kernel loaded, first launches done
    # timed keeping only the token ids (a decode step then copies nothing else to the host)
    timed = min((model.generate(prompts, args.new, keep_logits=False) for _ in range(3)), key=lambda g: g.decode_s)
    decode_mode = model.decode_mode
    capture_error = model.capture_error
    edges, edges_error = model.programmatic_edges, model.programmatic_error
    step_kernels = model.step_kernels
    # the same graph without programmatic edges: what the overlap of neighbouring kernels is worth
    model.programmatic_launch = False
    plain = min((model.generate(prompts, args.new, keep_logits=False) for _ in range(3)), key=lambda g: g.decode_s)
    model.programmatic_launch = True
    ours_prefill = min(model.generate(prompts, 2, keep_logits=False).prefill_s for _ in range(3))
    ours = model.generate(prompts, args.new)  # the logits, for the comparison below

    # plain torch eager in the model's precision on the same weights (int4: its dequantised fp16)
    tdtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    half_weights = {**stored, **{n: f.to(tdtype) for n, f in full.items()}}
    eager = TorchLlama(torch, baseline_config(config), half_weights.__getitem__, tdtype)
    ids = torch.tensor(prompts[0], device=DEVICE)

    def eager_generate(new: int):
        cache = eager.new_cache(args.prompt + new)
        synchronize(torch)
        begin = time.perf_counter()
        logits = eager.forward(ids, 0, cache)
        token = logits[-1].argmax()
        synchronize(torch)
        prefill_s = time.perf_counter() - begin
        begin = time.perf_counter()
        for position in range(args.prompt, args.prompt + new - 1):
            token = eager.forward(token[None], position, cache)[-1].argmax()
        synchronize(torch)
        return prefill_s, time.perf_counter() - begin

    with torch.inference_mode():
        eager_generate(4)
        runs = [eager_generate(args.new) for _ in range(2)]
    eager_prefill_s, eager_decode_s = min(r[0] for r in runs), min(r[1] for r in runs)
    del half_weights, eager

    # float32 torch, teacher-forced over our tokens, one layer's weights widened at a time
    f32 = TorchLlama(torch, baseline_config(config), lambda n: full[n] if n in full else stored[n].float(),
                     torch.float32)
    sequence = torch.tensor(np.concatenate([prompts[0], ours.tokens[0, :-1]]), device=DEVICE)
    with torch.inference_mode():
        want = f32.forward(sequence, 0, f32.new_cache(sequence.shape[0]))[args.prompt - 1:].cpu().numpy()
    got = ours.logits[0]
    max_abs = float(np.abs(got - want).max())
    max_rel = max_abs / float(np.abs(want).max())
    same = float(np.mean(got.argmax(-1) == want.argmax(-1)))

    decode_tokens = args.new - 1
    kv_bytes = 2 * config.num_hidden_layers * config.kv_size * 2 * (args.prompt + args.new / 2)
    per_token = weight_bytes(config, args.quantize, args.group_size, args.dtype) + kv_bytes
    floor = rate / per_token
    result = {
        "model": config.name, "dtype": args.dtype, "quantize": args.quantize, "prompt": args.prompt, "new": args.new,
        "kernels_tuned": sum(1 for k in model.used.values() if k.tuned), "kernels": len(model.used),
        "decode_mode": decode_mode, "capture_error": capture_error, "same_tokens_as_timed": bool((ours.tokens == timed.tokens).all()),
        "step_kernels": step_kernels, "programmatic_edges": edges, "programmatic_error": edges_error,
        "decode_tokens_per_s_plain_graph": decode_tokens / plain.decode_s,
        "same_tokens_plain_graph": bool((plain.tokens == timed.tokens).all()),
        "decode_tokens_per_s": decode_tokens / timed.decode_s, "prefill_tokens_per_s": args.prompt / ours_prefill,
        "streaming_bytes_per_s": rate, "bytes_per_decode_token": per_token, "floor_tokens_per_s": floor,
        "share_of_floor": decode_tokens / timed.decode_s / floor,
        "torch_decode_tokens_per_s": decode_tokens / eager_decode_s,
        "torch_prefill_tokens_per_s": args.prompt / eager_prefill_s,
        "decode_vs_torch": eager_decode_s / timed.decode_s, "prefill_vs_torch": eager_prefill_s / ours_prefill,
        "logits_vs_torch_float32": {"max_abs": max_abs, "max_rel": max_rel, "same_argmax_share": same},
        "decode_profile": None,
    }
    print(json.dumps(result), flush=True)  # kept even if the profiler below takes the process down
    # torch's profiler over the captured graph last: it has never run on these graphs on hardware
    profile = result["decode_profile"] = decode_profile(torch, model, prompts, 16, timed.decode_s / decode_tokens)
    print(json.dumps(result), flush=True)  # the summary reads the last line
    print(f"{config.name} {args.dtype} {args.quantize} ({decode_mode} steps): decode "
          f"{result['decode_tokens_per_s']:.1f} tok/s = "
          f"{result['share_of_floor'] * 100:.0f}% of the floor {floor:.1f} (streaming {rate / 1e12:.2f} TB/s), "
          f"{result['decode_vs_torch']:.2f}x torch eager ({result['torch_decode_tokens_per_s']:.1f}); prefill "
          f"{result['prefill_tokens_per_s']:.0f} tok/s, {result['prefill_vs_torch']:.2f}x torch; logits vs torch "
          f"float32: max {max_abs:.2e} ({max_rel:.1e} relative), same argmax {same * 100:.0f}%", file=sys.stderr)
    print(f"  {step_kernels} kernels and {edges} programmatic edges in the graph"
          f"{f' (refused: {edges_error})' if edges_error else ''}; "
          f"without them {result['decode_tokens_per_s_plain_graph']:.1f} tok/s", file=sys.stderr)
    if profile and "kernels" in profile:
        print(f"a decode step from a timed run: {profile['wall_us_per_step']:.0f} us, "
              f"{profile['in_kernels_share'] * 100:.0f}% of it in kernels:", file=sys.stderr)
        for name, k in profile["kernels"].items():
            print(f"  {name:<24}{k['us_per_step']:>9.1f} us {k['launches_per_step']:>6.1f} launches "
                  f"{k['share_of_step'] * 100:>5.1f}%", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Helpers over ``llvmlite.ir`` for CPU kernels: loops, vectors, fma, reductions, threads.

Templates decide what to compute; this module only turns that plan into IR text. Nothing
here compiles: ``measure.compile_llvm`` does, in worker processes.

Calling convention of every CPU kernel: pointer arguments then int64 scalars, in the order
of the kernel's ``ArgSpec`` list. The entry function runs the whole operator; when a
schedule is parallel, it splits a range of chunks into shares that the process's persistent
worker pool runs (``llvm_pool``: the calling thread takes the first share) and returns once
all are done.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import llvmlite.ir as ir

from . import llvm_pool
from .ir_loop import counted_loop

F32 = ir.FloatType()
F64 = ir.DoubleType()
BF16 = ir.IntType(16)  # bfloat16 travels as raw 16-bit words and is widened by shifting
HALF = ir.HalfType()
I1 = ir.IntType(1)
I8 = ir.IntType(8)
I16 = ir.IntType(16)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
VOID = ir.VoidType()
PTR = I8.as_pointer()

_ELEMENT = {"float32": F32, "float64": F64, "bfloat16": BF16, "float16": HALF,
            "uint8": I8, "int8": I8, "int32": I32, "int64": I64, "uint16": I16}


class BFloatType(ir.types._BaseFloatType):
    """LLVM's ``bfloat``, which llvmlite.ir lacks: only the operand type of the AVX-512 BF16
    dot-product intrinsic here (values are bitcast to it from raw 16-bit words)."""

    null = "0.0"
    intrinsic_name = "bf16"

    def __str__(self) -> str:
        return "bfloat"


BFloatType._create_instance()
BFLOAT = BFloatType()


def element_type(dtype: str) -> ir.Type:
    return _ELEMENT[dtype]


def vec(n: int, element: ir.Type = F32) -> ir.VectorType:
    return ir.VectorType(element, n)


def i64(value: int) -> ir.Constant:
    return ir.Constant(I64, int(value))


def f32(value: float) -> ir.Constant:
    return ir.Constant(F32, float(value))


def new_module(name: str) -> ir.Module:
    module = ir.Module(name=name)
    # The triple is set at compile time for the chosen target; an empty one keeps IR portable.
    return module


def declare_intrinsic(module: ir.Module, name: str, ret: ir.Type, args: Sequence[ir.Type]) -> ir.Function:
    existing = module.globals.get(name)
    if existing is not None:
        return existing
    return ir.Function(module, ir.FunctionType(ret, list(args)), name=name)


def _vname(t: ir.VectorType) -> str:
    el = t.element
    tag = "f32" if el == F32 else "f64" if el == F64 else f"i{el.width}"
    return f"v{t.count}{tag}"


def _suffix(t: ir.Type) -> str:
    """The overload suffix of a float intrinsic for scalar or vector type ``t``."""
    return _vname(t) if isinstance(t, ir.VectorType) else ("f32" if t == F32 else "f64")


class KernelBuilder:
    """An ``ir.IRBuilder`` plus the handful of constructs kernels are made of."""

    def __init__(self, function: ir.Function, fast_math: bool = True):
        self.function = function
        self.module: ir.Module = function.module
        self.b = ir.IRBuilder(function.append_basic_block("entry"))
        # Reassociation lets LLVM vectorise scalar reductions; kernels tolerate its rounding.
        # No nnan/ninf: masked attention scores are -inf and exp() must see them.
        self.fm = ("reassoc", "nsz", "arcp", "contract", "afn") if fast_math else ()

    # -- arithmetic --------------------------------------------------------------------
    def fadd(self, a, b):
        return self.b.fadd(a, b, flags=self.fm)

    def fsub(self, a, b):
        return self.b.fsub(a, b, flags=self.fm)

    def fmul(self, a, b):
        return self.b.fmul(a, b, flags=self.fm)

    def fdiv(self, a, b):
        return self.b.fdiv(a, b, flags=self.fm)

    def fma(self, a, b, c):
        """a * b + c with one rounding (the llvm.fma intrinsic, scalar or vector)."""
        t = a.type
        fn = declare_intrinsic(self.module, f"llvm.fma.{_suffix(t)}", t, [t, t, t])
        return self.b.call(fn, [a, b, c])

    def call_math(self, name: str, x):
        """A float math intrinsic such as exp, sqrt, tanh-free pieces: ``llvm.<name>.<type>``."""
        t = x.type
        fn = declare_intrinsic(self.module, f"llvm.{name}.{_suffix(t)}", t, [t])
        return self.b.call(fn, [x], fastmath=self.fm)

    def _const_like(self, value, like):
        t = like.type
        if isinstance(t, ir.VectorType):
            return ir.Constant(t, [value] * t.count)
        return ir.Constant(t, value)

    def exp(self, x):
        """exp(x) for float32 scalars or vectors: range reduction and a degree-6 polynomial
        (Cephes expf, about 2 ulp), vectorised inline instead of a libm call per lane.
        Inputs below -87.3 (including -inf) give exactly 0."""
        b = self.b
        c = lambda v: self._const_like(v, x)  # noqa: E731
        low = b.fcmp_ordered("<", x, c(-87.3))
        clamped = self.fmax(self.fmin(x, c(88.37)), c(-87.3))
        n = self.call_math("rint", self.fmul(clamped, c(1.4426950408889634)))
        r = self.fma(n, c(-0.693359375), clamped)
        r = self.fma(n, c(2.12194440e-4), r)
        poly = c(1.9875691500e-4)
        for coeff in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
            poly = self.fma(poly, r, c(coeff))
        y = self.fadd(self.fma(poly, self.fmul(r, r), r), c(1.0))
        int_type = vec(x.type.count, I32) if isinstance(x.type, ir.VectorType) else I32
        # 2^n as 2^(n-1) * 2: n reaches 128 near the top of the range, one past the exponent field
        bits = b.shl(b.add(b.fptosi(n, int_type), self._const_like(126, ir.Constant(int_type, None))),
                     self._const_like(23, ir.Constant(int_type, None)))
        result = self.fmul(self.fmul(y, b.bitcast(bits, x.type)), c(2.0))
        return b.select(low, c(0.0), result)

    def tanh(self, x):
        """tanh(x): an odd polynomial for |x| < 0.625 (Cephes tanhf), where the exp form
        would cancel, and 1 - 2 / (1 + exp(2x)) elsewhere, saturating cleanly at +-1."""
        c = lambda v: self._const_like(v, x)  # noqa: E731
        z = self.fmul(x, x)
        poly = c(-5.70498872745e-3)
        for coeff in (2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1, -3.33332819422e-1):
            poly = self.fma(poly, z, c(coeff))
        small = self.fma(self.fmul(poly, z), x, x)
        large = self.fsub(c(1.0), self.fdiv(c(2.0), self.fadd(c(1.0), self.exp(self.fmul(c(2.0), x)))))
        magnitude = self.call_math("fabs", x)
        return self.b.select(self.b.fcmp_ordered("<", magnitude, c(0.625)), small, large)

    def fmin(self, a, b):
        t = a.type
        fn = declare_intrinsic(self.module, f"llvm.minnum.{_suffix(t)}", t, [t, t])
        return self.b.call(fn, [a, b])

    def fmax(self, a, b):
        t = a.type
        fn = declare_intrinsic(self.module, f"llvm.maxnum.{_suffix(t)}", t, [t, t])
        return self.b.call(fn, [a, b])

    # -- memory ------------------------------------------------------------------------
    def gep(self, base, index, element: ir.Type = F32):
        """Address of ``base[index]`` where base points at ``element``s."""
        ptr = self.b.bitcast(base, element.as_pointer()) if base.type != element.as_pointer() else base
        if isinstance(index, int):
            index = i64(index)
        return self.b.gep(ptr, [index], inbounds=True)

    def ptr(self, value):
        """Any pointer as an untyped ``ptr`` (i8*), the type kernel functions take."""
        return value if value.type == PTR else self.b.bitcast(value, PTR)

    def load(self, base, index, element: ir.Type = F32):
        return self.b.load(self.gep(base, index, element), align=_align(element))

    def store(self, value, base, index, element: ir.Type = F32):
        self.b.store(value, self.gep(base, index, element), align=_align(element))

    def load_vec(self, base, index, lanes: int, element: ir.Type = F32):
        """Unaligned load of ``lanes`` consecutive elements starting at ``base[index]``."""
        addr = self.b.bitcast(self.gep(base, index, element), vec(lanes, element).as_pointer())
        return self.b.load(addr, align=_align(element))

    def store_vec(self, value, base, index, element: ir.Type = F32):
        lanes = value.type.count
        addr = self.b.bitcast(self.gep(base, index, element), vec(lanes, element).as_pointer())
        self.b.store(value, addr, align=_align(element))

    def lane_mask(self, lanes: int, count):
        """<lanes x i1> with the first ``count`` lanes set (count is an i64 value)."""
        idx = ir.Constant(vec(lanes, I64), [i for i in range(lanes)])
        return self.b.icmp_signed("<", idx, self.splat(count, lanes))

    def masked_load_vec(self, base, index, lanes: int, count, element: ir.Type = F32):
        """Load only the first ``count`` lanes (the rest read as zero): safe at array ends."""
        t = vec(lanes, element)
        fn = declare_intrinsic(self.module, f"llvm.masked.load.{_vname(t)}.p0", t,
                               [PTR, I32, vec(lanes, I1), t])
        addr = self.b.bitcast(self.gep(base, index, element), PTR)
        return self.b.call(fn, [addr, ir.Constant(I32, _align(element)), self.lane_mask(lanes, count),
                                ir.Constant(t, None)])

    def masked_store_vec(self, value, base, index, count, element: ir.Type = F32):
        t = value.type
        lanes = t.count
        fn = declare_intrinsic(self.module, f"llvm.masked.store.{_vname(t)}.p0", VOID,
                               [t, PTR, I32, vec(lanes, I1)])
        addr = self.b.bitcast(self.gep(base, index, element), PTR)
        if _align(element) >= 4:
            self.b.call(fn, [value, addr, ir.Constant(I32, _align(element)), self.lane_mask(lanes, count)])
            return
        # LLVM 22 on x86 stores TWO 16-bit lanes for a masked store whose mask it folds to one
        # lane (seen with count = 1 known at compile time): one element past a row's end. A
        # single lane is stored as a scalar instead.
        with self.b.if_else(self.b.icmp_signed("==", count, i64(1))) as (one, more):
            with one:
                self.store(self.b.extract_element(value, ir.Constant(I32, 0)), base, index, element)
            with more:
                self.b.call(fn, [value, addr, ir.Constant(I32, _align(element)), self.lane_mask(lanes, count)])

    def prefetch(self, base, index, element: ir.Type = F32, write: bool = False, locality: int = 3):
        fn = declare_intrinsic(self.module, "llvm.prefetch.p0", VOID, [PTR, I32, I32, I32])
        addr = self.b.bitcast(self.gep(base, index, element), PTR)
        self.b.call(fn, [addr, ir.Constant(I32, int(write)), ir.Constant(I32, locality), ir.Constant(I32, 1)])

    # -- vectors -----------------------------------------------------------------------
    def splat(self, scalar, lanes: int):
        t = vec(lanes, scalar.type)
        one = self.b.insert_element(ir.Constant(t, ir.Undefined), scalar, ir.Constant(I32, 0))
        return self.b.shuffle_vector(one, ir.Constant(t, ir.Undefined), ir.Constant(vec(lanes, I32), [0] * lanes))

    def zeros(self, lanes: int, element: ir.Type = F32):
        return ir.Constant(vec(lanes, element), None)

    def _reduce(self, value, combine):
        """Fold a vector to a scalar by halving shuffles (a fixed, portable order)."""
        lanes = value.type.count
        while lanes > 1:
            half = lanes // 2
            lo = self.b.shuffle_vector(value, value, ir.Constant(vec(half, I32), list(range(half))))
            hi = self.b.shuffle_vector(value, value, ir.Constant(vec(half, I32), list(range(half, lanes))))
            value = combine(lo, hi)
            lanes = half
        return self.b.extract_element(value, ir.Constant(I32, 0))

    def reduce_add(self, value):
        """Horizontal sum of a float vector."""
        return self._reduce(value, self.fadd)

    def reduce_add_many(self, vectors: Sequence) -> tuple[ir.Value, int]:
        """Sum each of several equal-width vectors; returns (vector of sums, its width P).

        P is len(vectors) rounded up to a power of two (missing ones count as zero). Pairs
        of vectors are folded together with shuffles, so P sums cost about P adds instead
        of P separate horizontal reductions.
        """
        lanes = vectors[0].type.count
        width = 1
        while width < len(vectors):
            width *= 2
        if width > lanes:
            raise ValueError(f"cannot reduce {len(vectors)} vectors of {lanes} lanes into one vector")
        work = list(vectors) + [self.zeros(lanes, vectors[0].type.element)] * (width - len(vectors))
        groups, group_lanes = 1, lanes
        while len(work) > 1:
            half = group_lanes // 2
            lo = [src * lanes + g * group_lanes + t for src in (0, 1) for g in range(groups) for t in range(half)]
            hi = [i + half for i in lo]
            paired = []
            for a, c in zip(work[0::2], work[1::2]):
                lo_v = self.b.shuffle_vector(a, c, ir.Constant(vec(lanes, I32), lo))
                hi_v = self.b.shuffle_vector(a, c, ir.Constant(vec(lanes, I32), hi))
                paired.append(self.fadd(lo_v, hi_v))
            work, groups, group_lanes = paired, groups * 2, half
        value = work[0]
        while group_lanes > 1:
            half = group_lanes // 2
            lo = [g * group_lanes + t for g in range(groups) for t in range(half)]
            hi = [i + half for i in lo]
            lo_v = self.b.shuffle_vector(value, value, ir.Constant(vec(len(lo), I32), lo))
            hi_v = self.b.shuffle_vector(value, value, ir.Constant(vec(len(hi), I32), hi))
            value, group_lanes = self.fadd(lo_v, hi_v), half
        return value, width

    def memcpy(self, dst, src, nbytes) -> None:
        fn = declare_intrinsic(self.module, "llvm.memcpy.p0.p0.i64", VOID, [PTR, PTR, I64, I1])
        nbytes = i64(nbytes) if isinstance(nbytes, int) else nbytes
        self.b.call(fn, [self.b.bitcast(dst, PTR), self.b.bitcast(src, PTR), nbytes, ir.Constant(I1, 0)])

    def reduce_max(self, value):
        """Horizontal maximum of a float vector."""
        return self._reduce(value, self.fmax)

    def bf16_to_f32(self, raw):
        """Widen bfloat16 bit patterns (i16 or <N x i16>) to float32: shift into the high half."""
        if isinstance(raw.type, ir.VectorType):
            wide = self.b.zext(raw, vec(raw.type.count, I32))
            wide = self.b.shl(wide, ir.Constant(vec(raw.type.count, I32), [16] * raw.type.count))
            return self.b.bitcast(wide, vec(raw.type.count, F32))
        wide = self.b.shl(self.b.zext(raw, I32), ir.Constant(I32, 16))
        return self.b.bitcast(wide, F32)

    def f16_to_f32(self, raw):
        """Widen IEEE half bit patterns (i16 or <N x i16>) to float32: bitcast to half, fpext
        (``vcvtph2ps`` with F16C)."""
        if isinstance(raw.type, ir.VectorType):
            return self.b.fpext(self.b.bitcast(raw, vec(raw.type.count, HALF)), vec(raw.type.count, F32))
        return self.b.fpext(self.b.bitcast(raw, HALF), F32)

    def words_to_f32(self, raw, dtype: str):
        """Widen raw 16-bit words of ``dtype`` (bfloat16 or float16) to float32."""
        return self.f16_to_f32(raw) if dtype == "float16" else self.bf16_to_f32(raw)

    def f32_to_bf16(self, value):
        """Round float32 (scalar or vector) to bfloat16 words, nearest even, exactly like
        ``ops.common.float32_to_bfloat16``: bits + 0x7FFF + ((bits >> 16) & 1), high half."""
        b = self.b
        lanes = value.type.count if isinstance(value.type, ir.VectorType) else 0
        i32 = vec(lanes, I32) if lanes else I32
        const = (lambda v: ir.Constant(i32, [v] * lanes)) if lanes else (lambda v: ir.Constant(I32, v))
        bits = b.bitcast(value, i32)
        odd = b.and_(b.lshr(bits, const(16)), const(1))
        rounded = b.add(b.add(bits, const(0x7FFF)), odd)
        return b.trunc(b.lshr(rounded, const(16)), vec(lanes, I16) if lanes else I16)

    def dot_bf16(self, acc, a, c):
        """acc[i] += a[2i] * c[2i] + a[2i+1] * c[2i+1]: the AVX-512 BF16 ``vdpbf16ps``.

        ``acc`` is <N x float>; ``a`` and ``c`` are <2N x i16> raw bfloat16 words (N = 4, 8
        or 16). Only for targets with avx512bf16; products of bfloat16 are exact in float32
        and the instruction flushes denormals."""
        lanes = acc.type.count
        width = {4: 128, 8: 256, 16: 512}[lanes]
        pair = vec(2 * lanes, BFLOAT)
        fn = declare_intrinsic(self.module, f"llvm.x86.avx512bf16.dpbf16ps.{width}", acc.type,
                               [acc.type, pair, pair])
        return self.b.call(fn, [acc, self.b.bitcast(a, pair), self.b.bitcast(c, pair)])

    def dot_i16(self, acc, a, c, vnni: bool = True):
        """acc[i] += a[2i] * c[2i] + a[2i+1] * c[2i+1] in int32: the VNNI ``vpdpwssd``.

        ``acc`` is <N x i32>, ``a`` and ``c`` are <2N x i16> (N = 8 or 16). ``vnni``: one
        instruction (avx512vnni; 8 lanes also avxvnni); else ``vpmaddwd`` and an add (avx2 for 8
        lanes, avx512bw for 16), the same sums in two instructions. The sum wraps on overflow, so
        callers bound their operands."""
        lanes = acc.type.count
        width = {8: 256, 16: 512}[lanes]
        pair = vec(2 * lanes, I16)
        if vnni:
            fn = declare_intrinsic(self.module, f"llvm.x86.avx512.vpdpwssd.{width}", acc.type, [acc.type, pair, pair])
            return self.b.call(fn, [acc, a, c])
        name = "llvm.x86.avx2.pmadd.wd" if lanes == 8 else "llvm.x86.avx512.pmaddw.d.512"
        fn = declare_intrinsic(self.module, name, acc.type, [pair, pair])
        return self.b.add(acc, self.b.call(fn, [a, c]))

    def local(self, ty: ir.Type, name: str = "acc"):
        """A stack slot in the entry block: SROA turns such slots into registers."""
        here = self.b.block
        entry = self.function.entry_basic_block
        if entry.instructions:
            self.b.position_before(entry.instructions[0])
        else:
            self.b.position_at_start(entry)
        slot = self.b.alloca(ty, name=name)
        self.b.position_at_end(here)
        return slot

    # -- control flow ------------------------------------------------------------------
    @contextlib.contextmanager
    def loop(self, start, stop, step: int = 1, name: str = "i") -> Iterator[ir.Value]:
        """``for (i = start; i < stop; i += step)``; bounds are ints or i64 values.

        The body may create blocks of its own; the loop closes wherever the body ends.
        """
        start = i64(start) if isinstance(start, int) else start
        stop = i64(stop) if isinstance(stop, int) else stop
        with counted_loop(self.b, start, stop, step, name) as index:
            yield index

    @contextlib.contextmanager
    def if_then(self, cond) -> Iterator[None]:
        with self.b.if_then(cond):
            yield

    def min(self, a, b):
        a = i64(a) if isinstance(a, int) else a
        b = i64(b) if isinstance(b, int) else b
        return self.b.select(self.b.icmp_signed("<", a, b), a, b)

    def max(self, a, b):
        a = i64(a) if isinstance(a, int) else a
        b = i64(b) if isinstance(b, int) else b
        return self.b.select(self.b.icmp_signed(">", a, b), a, b)

    def ret(self) -> None:
        self.b.ret_void()

    def sincos(self, x):
        """(sin x, cos x) as float32, for float32 or float64 scalars or vectors.

        x = k pi/2 + r with |r| <= pi/4: k = rint(x 2/pi), and r by fused multiply-adds
        with pi/2 split in three parts (Cody-Waite), in x's own precision. r is then rounded
        to float32 for the polynomials (Cephes sinf / cosf, about 1 ulp on |r| <= pi/4), and
        k mod 4 picks and signs them. A float64 argument stays exact to float32 precision
        for |x| up to 1e9 (RoPE angles, positions x frequencies, reach thousands of
        radians, where a float32 argument alone would already be off by 1e-4); a float32
        argument is reduced in float32, exact for the value it holds, for |x| up to 1e5.
        """
        b = self.b
        t = x.type
        lanes = t.count if isinstance(t, ir.VectorType) else 0
        wide = (t.element if lanes else t) == F64
        c = lambda v: self._const_like(v, x)  # noqa: E731
        k = self.call_math("rint", self.fmul(x, c(0.6366197723675814)))
        minus_k = b.fneg(k)
        r = x
        for part in (_HALF_PI_F64 if wide else _HALF_PI_F32):
            r = self.fma(minus_k, c(part), r)  # exact products: no reassociation here
        quadrant = b.fptosi(k, vec(lanes, I32) if lanes else I32)
        if wide:
            r = b.fptrunc(r, vec(lanes, F32) if lanes else F32)
        f = lambda v: self._const_like(v, r)  # noqa: E731
        z = self.fmul(r, r)
        poly = self.fma(self.fma(f(-1.9515295891e-4), z, f(8.3321608736e-3)), z, f(-1.6666654611e-1))
        sin_r = self.fma(self.fmul(poly, z), r, r)
        poly = self.fma(self.fma(f(2.443315711809948e-5), z, f(-1.388731625493765e-3)), z,
                        f(4.166664568298827e-2))
        cos_r = self.fma(self.fmul(poly, z), z, self.fma(f(-0.5), z, f(1.0)))
        q = lambda v: self._const_like(v, quadrant)  # noqa: E731
        bit = lambda value, mask: b.icmp_signed("!=", b.and_(value, q(mask)), q(0))  # noqa: E731
        swap = bit(quadrant, 1)
        sin_x = b.select(swap, cos_r, sin_r)
        cos_x = b.select(swap, sin_r, cos_r)
        sin_x = b.select(bit(quadrant, 2), b.fneg(sin_x), sin_x)
        cos_x = b.select(bit(b.add(quadrant, q(1)), 2), b.fneg(cos_x), cos_x)
        return sin_x, cos_x

    def exp_fast(self, x, nonpositive: bool = False):
        """exp(x) for float32 scalars or vectors, relative error below 5e-7 (about 4 ulp), in
        8 multiply-adds instead of ``exp``'s 12: for kernels whose speed is the exp's (softmax,
        SiLU, GELU), where that many ulps vanish in the 2e-4 tolerance of float32 kernels.

        rint(x log2 e) comes from adding 1.5 * 2^23 + 127 (the float's rounding does it, and
        the low mantissa bits are then n + 127: shifted into the exponent field they are
        2^n); r = x - n ln 2 with ln 2 in one float (its error, 2e-9 n, stays below 3e-7);
        exp(r) on |r| <= ln 2 / 2 is 1 + r + r^2 P(r) with P a degree-3 minimax fit (1e-7).
        Inputs below -87.3 (including -inf) give exactly 0; inputs above 88 give exp(88).
        ``nonpositive``: the caller guarantees x <= 0 (x - max in softmax), so the upper
        clamp is left out.
        """
        b = self.b
        c = lambda v: self._const_like(v, x)  # noqa: E731
        low = b.fcmp_ordered("<", x, c(-87.3))
        clamped = x if nonpositive else self.fmin(x, c(88.0))
        clamped = b.select(low, c(-87.3), clamped)
        magic = 12582912.0 + 127.0
        shifted = self.fma(clamped, c(1.4426950408889634), c(magic))
        n = b.fsub(shifted, c(magic))  # exact: plain fsub, no fast-math flags
        r = self.fma(n, c(-0.6931471805599453), clamped)
        poly = c(8.312528021633625e-3)
        for coeff in (4.189011827111244e-2, 1.6667114198207855e-1, 4.99992311000824e-1, 1.0, 1.0):
            poly = self.fma(poly, r, c(coeff))
        int_type = vec(x.type.count, I32) if isinstance(x.type, ir.VectorType) else I32
        bits = b.shl(b.bitcast(shifted, int_type), self._const_like(23, ir.Constant(int_type, None)))
        result = self.fmul(poly, b.bitcast(bits, x.type))
        return b.select(low, c(0.0), result)

    def reciprocal_avx512(self, x):
        """1 / x for float32 vectors of 4, 8 or 16 lanes, x finite and nonzero: the AVX-512
        estimate vrcp14ps (relative error below 2^-14) refined by one Newton step (two FMAs,
        error below 1e-8), instead of a division, whose throughput bounds kernels such as
        SiLU and GELU. Only for targets with avx512f (and avx512vl below 16 lanes): the
        caller checks ``Target.has_feature``.
        """
        t = x.type
        mask = I16 if t.count == 16 else I8
        fn = declare_intrinsic(self.module, f"llvm.x86.avx512.rcp14.ps.{32 * t.count}", t, [t, t, mask])
        estimate = self.b.call(fn, [x, ir.Constant(t, None), ir.Constant(mask, -1)])
        one = self._const_like(1.0, x)
        error = self.fma(self.b.fneg(x), estimate, one)
        return self.fma(estimate, error, estimate)

    def sin(self, x):
        """sin x as float32 (see ``sincos``)."""
        return self.sincos(x)[0]

    def cos(self, x):
        """cos x as float32 (see ``sincos``)."""
        return self.sincos(x)[1]



def _split_half_pi(round_to: Callable[[float], float]) -> tuple[float, float, float]:
    """pi/2 as three numbers of a float format whose sum carries three times its precision."""
    from fractions import Fraction

    half_pi = Fraction(_PI_DIGITS) / 2
    parts = []
    for _ in range(3):
        part = round_to(float(half_pi))
        parts.append(part)
        half_pi -= Fraction(part)
    return tuple(parts)


def _round_f32(value: float) -> float:
    import struct

    return struct.unpack("f", struct.pack("f", value))[0]


_PI_DIGITS = "3.14159265358979323846264338327950288419716939937510582097494459230781640628620899863"
_HALF_PI_F64 = _split_half_pi(float)
_HALF_PI_F32 = _split_half_pi(_round_f32)

def _align(element: ir.Type) -> int:
    width = getattr(element, "width", None)
    if width is None:
        width = 64 if element == F64 else 16 if isinstance(element, ir.HalfType) else 32
    return max(width // 8, 1)


def kernel_function(module: ir.Module, name: str, n_pointers: int, n_scalars: int = 0,
                    extra: Sequence[ir.Type] = (), noalias: bool = True) -> ir.Function:
    """Declare ``void name(ptr x n_pointers, i64 x n_scalars, extra...)`` with noalias pointers."""
    types = [PTR] * n_pointers + [I64] * n_scalars + list(extra)
    fn = ir.Function(module, ir.FunctionType(VOID, types), name=name)
    for arg in fn.args[:n_pointers]:
        if noalias:
            arg.add_attribute("noalias")
    fn.attributes.add("nounwind")
    return fn


def parallel_entry(module: ir.Module, name: str, body: ir.Function, n_pointers: int, n_scalars: int,
                   threads: int, n_chunks: int | Callable[[KernelBuilder, list], ir.Value],
                   prologue: ir.Function | None = None) -> ir.Function:
    """Define the kernel entry ``name(ptrs..., scalars...)`` running ``body`` over chunks.

    ``prologue``, when given, takes the entry's arguments and runs once on the calling
    thread before any chunk (e.g. to lay out an operand in a shared workspace).

    ``body`` has the entry's arguments plus ``(i64 chunk_begin, i64 chunk_end, i64 thread)``;
    ``thread`` (0..threads-1) selects per-thread scratch in a workspace. With one
    thread the entry calls it on the whole range; otherwise share t (t = 0 on the caller)
    runs chunks [t*n/threads, (t+1)*n/threads), handed to the process's worker pool
    (``llvm_pool``: threads created once, woken per call). A share the pool cannot give a
    thread runs on the calling thread, so the result never depends on getting threads.
    """
    entry = kernel_function(module, name, n_pointers, n_scalars)
    kb = KernelBuilder(entry)
    b = kb.b
    args = list(entry.args)
    if prologue is not None:
        b.call(prologue, args)
    total = n_chunks(kb, args) if callable(n_chunks) else i64(n_chunks)
    if threads <= 1:
        b.call(body, args + [i64(0), total, i64(0)])
        kb.ret()
        return entry

    # share(ctx, t): the entry's arguments and the chunk count travel in one struct on the
    # caller's stack, which outlives every share (the pool returns when all are done)
    ctx_type = ir.LiteralStructType([a.type for a in args] + [I64])
    share = ir.Function(module, llvm_pool.TASK, name=f"{name}.share")
    share.linkage = "internal"
    share.attributes.add("nounwind")
    sb = ir.IRBuilder(share.append_basic_block("entry"))
    ctx = sb.bitcast(share.args[0], ctx_type.as_pointer())
    fields = [sb.load(sb.gep(ctx, [ir.Constant(I32, 0), ir.Constant(I32, i)], inbounds=True))
              for i in range(len(args) + 1)]
    chunks, t = fields[-1], share.args[1]
    lo = sb.sdiv(sb.mul(chunks, t), i64(threads))
    hi = sb.sdiv(sb.mul(chunks, sb.add(t, i64(1))), i64(threads))
    sb.call(body, fields[:-1] + [lo, hi, t])
    sb.ret_void()

    slot = b.alloca(ctx_type, name="ctx")
    for i, value in enumerate(args + [total]):
        b.store(value, b.gep(slot, [ir.Constant(I32, 0), ir.Constant(I32, i)], inbounds=True))
    b.call(llvm_pool.declare_run(module), [share, b.bitcast(slot, PTR), i64(threads)])
    kb.ret()
    return entry


def chunk_body(module: ir.Module, name: str, n_pointers: int, n_scalars: int) -> tuple[ir.Function, KernelBuilder]:
    """Declare the per-chunk body for ``parallel_entry``: entry args + (begin, end, thread)."""
    fn = kernel_function(module, name, n_pointers, n_scalars, extra=[I64, I64, I64])
    fn.linkage = "internal"
    return fn, KernelBuilder(fn)

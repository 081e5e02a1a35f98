"""The counted loop every generated function uses, over a plain ``llvmlite.ir.IRBuilder``:
kernels (``llvm.KernelBuilder.loop``) and the worker pool (``llvm_pool``) alike."""
from __future__ import annotations

import contextlib
from typing import Iterator

import llvmlite.ir as ir

I64 = ir.IntType(64)


@contextlib.contextmanager
def counted_loop(b: ir.IRBuilder, start: ir.Value, stop: ir.Value, step: int = 1,
                 name: str = "i") -> Iterator[ir.Value]:
    """``for (i = start; i < stop; i += step)`` over i64 values, yielding i.

    The body may create blocks of its own; the loop closes wherever the body ends.
    """
    pre = b.block
    header = b.append_basic_block(f"{name}.header")
    body = b.append_basic_block(f"{name}.body")
    done = b.append_basic_block(f"{name}.done")
    b.branch(header)
    b.position_at_end(header)
    index = b.phi(I64, name=name)
    index.add_incoming(start, pre)
    b.cbranch(b.icmp_signed("<", index, stop), body, done)
    b.position_at_end(body)
    yield index
    nxt = b.add(index, ir.Constant(I64, step), name=f"{name}.next", flags=("nsw",))
    index.add_incoming(nxt, b.block)
    b.branch(header)
    b.position_at_end(done)

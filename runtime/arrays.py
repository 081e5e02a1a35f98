"""Where a model keeps its activations, weights and KV cache: host memory (numpy) for CPU
kernels, device memory for CUDA kernels (pycuda, imported on first use).

The decoder needs only a handful of operations besides the kernels: allocate, copy a
whole buffer in or out, and three strided copies (a decode step's K/V rows into the cache,
a prompt's K/V into the cache, one token of each prompt). On the device each is one
``cuMemcpy2D``; the layouts are those of ``runtime.plan``: activations ``[rows, width]``,
the cache ``[B, HKV, S, D]`` per layer.
"""
from __future__ import annotations

import math

import numpy as np


class HostArrays:
    """numpy arrays: for kernels that run on the CPU."""

    kind = "cpu"
    resident = False  # the host drives each kernel of a decode step

    def empty(self, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        return np.empty(shape, dtype)

    def zeros(self, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        return np.zeros(shape, dtype)

    def upload(self, host: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(host)

    def set(self, buffer: np.ndarray, host: np.ndarray) -> None:
        buffer.reshape(-1)[:] = np.asarray(host).reshape(-1)

    def get(self, buffer: np.ndarray) -> np.ndarray:
        return buffer

    def gather_rows(self, buffer: np.ndarray, table: np.ndarray, ids: np.ndarray) -> None:
        """buffer[i] = table[ids[i]]: a decode step's embedding, without a temporary for ``set``."""
        buffer[...] = table[ids]  # out-of-range ids raise IndexError, as np.take does

    def fill(self, buffer: np.ndarray, value) -> None:
        buffer.fill(value)

    def write_position(self, cache: np.ndarray, rows: np.ndarray, position: int) -> None:
        """cache[B, HKV, S, D][:, :, position] = rows[B * HKV, D]."""
        b, hkv, _, d = cache.shape
        cache[:, :, position] = rows.reshape(b, hkv, d)

    def position_writer(self, cache: np.ndarray, rows: np.ndarray):
        """``write(position)``: ``write_position(cache, rows, position)`` with the views made
        once (a decode step writes two per layer; the reshapes cost as much as the copy)."""
        b, hkv, _, d = cache.shape
        by_position = cache.transpose(2, 0, 1, 3)  # [S, B, HKV, D], a view
        source = rows.reshape(b, hkv, d)
        if not np.shares_memory(source, rows):  # a copy would go stale: the kernels rewrite rows each step
            raise ValueError(f"rows {rows.shape} must be contiguous to write into a cache of {cache.shape}")

        def write(position: int) -> None:
            by_position[position] = source

        return write

    def write_prompt(self, cache: np.ndarray, rows: np.ndarray, tokens: int) -> None:
        """cache[:, :, :tokens] = rows[B * tokens, HKV * D], token-major as projected."""
        b, hkv, _, d = cache.shape
        cache[:, :, :tokens] = rows.reshape(b, tokens, hkv, d).transpose(0, 2, 1, 3)

    def split_columns(self, rows: np.ndarray, widths: tuple[int, ...]):
        """Arrays for the column blocks of ``rows`` [R, sum(widths)] (a fused projection's
        output), and a call that fills them: None when they are views, as with one row."""
        edges = np.cumsum((0, *widths))
        if rows.shape[0] == 1:
            return [rows[:, a:b] for a, b in zip(edges, edges[1:])], None
        parts = [np.empty((rows.shape[0], w), rows.dtype) for w in widths]

        def split() -> None:
            for part, a, b in zip(parts, edges, edges[1:]):
                part[...] = rows[:, a:b]
        return parts, split

    def rows_at(self, rows: np.ndarray, sequences: int, index: int, out: np.ndarray) -> np.ndarray:
        """out[b] = row ``index`` of sequence b in rows[sequences * T, width]."""
        width = rows.shape[-1]
        out[:] = rows.reshape(sequences, -1, width)[:, index]
        return out


class DeviceArray:
    """A device allocation with a shape and dtype (what kernels check before they bind it)."""

    def __init__(self, allocation, shape: tuple[int, ...], dtype):
        self.allocation = allocation
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self.size = math.prod(self.shape)
        self.nbytes = self.size * self.dtype.itemsize
        self.gpudata = int(allocation)

    def part(self, start: int, shape: tuple[int, ...]) -> "DeviceArray":
        """Elements ``start`` .. ``start + prod(shape)`` as an array of their own (a view)."""
        count = math.prod(shape)
        if not 0 <= start <= start + count <= self.size:
            raise ValueError(f"elements {start}..{start + count} are not inside {self.shape}")
        view = DeviceArray(self.gpudata + start * self.dtype.itemsize, shape, self.dtype)
        view.owner = self  # the view keeps the memory alive
        return view

    def reshape(self, *shape) -> "DeviceArray":
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        if math.prod(shape) != self.size:
            raise ValueError(f"cannot view {self.shape} as {shape}")
        return DeviceArray(self.allocation, shape, self.dtype)


class CudaArrays:
    """Device memory through pycuda's driver API. Every copy is queued on ``stream``, the
    stream the kernels launch on, so the host never waits between kernels: only ``get``
    (the logits, once a step) waits for what was queued before it."""

    kind = "cuda"
    # on a device: a decode step can stay there whole (positions and lengths read from device
    # memory, the argmax on the device) and be captured as one graph
    resident = True

    def __init__(self, stream=None) -> None:
        try:
            import pycuda.driver as drv

            import pycuda.autoprimaryctx  # noqa: F401 - the device's primary context, as torch uses
        except ImportError as exc:
            raise RuntimeError("a model on CUDA kernels needs pycuda (the project's cuda extra, pip install -e '.[cuda]')") from exc
        self.drv = drv
        if stream is None:
            from .library_cuda import model_stream

            stream = model_stream()
        self.stream = stream

    def empty(self, shape: tuple[int, ...], dtype=np.float32) -> DeviceArray:
        nbytes = max(math.prod(shape) * np.dtype(dtype).itemsize, 1)
        return DeviceArray(self.drv.mem_alloc(nbytes), shape, dtype)

    def zeros(self, shape: tuple[int, ...], dtype=np.float32) -> DeviceArray:
        array = self.empty(shape, dtype)
        self.drv.memset_d8_async(array.allocation, 0, max(array.nbytes, 1), self.stream)
        return array

    def upload(self, host: np.ndarray) -> DeviceArray:
        host = np.ascontiguousarray(host)
        array = self.empty(host.shape, host.dtype)
        self.drv.memcpy_htod_async(array.allocation, host, self.stream)
        return array

    def set(self, buffer: DeviceArray, host: np.ndarray) -> None:
        host = np.ascontiguousarray(host, dtype=buffer.dtype)
        if host.size != buffer.size:  # the copy would run past the allocation
            raise ValueError(f"cannot copy {host.shape} values into a device buffer of {buffer.shape}")
        # from pageable memory the driver stages the bytes before returning: ``host`` may go
        self.drv.memcpy_htod_async(buffer.allocation, host, self.stream)

    def get(self, buffer: DeviceArray) -> np.ndarray:
        """A copy on the host, once the kernels queued before it have written ``buffer``."""
        host = np.empty(buffer.shape, buffer.dtype)
        self.drv.memcpy_dtoh_async(host, buffer.allocation, self.stream)
        self.stream.synchronize()
        return host

    def _copy_2d(self, dst: int, dst_pitch: int, src, src_pitch: int, width: int, height: int) -> None:
        copy = self.drv.Memcpy2D()
        if isinstance(src, np.ndarray):
            copy.set_src_host(src)
        else:
            copy.set_src_device(src)
        copy.set_dst_device(dst)
        copy.src_pitch, copy.dst_pitch, copy.width_in_bytes, copy.height = src_pitch, dst_pitch, width, height
        copy(self.stream)

    def gather_rows(self, buffer: DeviceArray, table: np.ndarray, ids: np.ndarray) -> None:
        """buffer[i] = table[ids[i]], gathered from a host ``table``."""
        self.set(buffer, np.take(table, ids, axis=0))

    def fill(self, buffer: DeviceArray, value) -> None:
        self.set(buffer, np.full(buffer.shape, value, buffer.dtype))

    def position_writer(self, cache: DeviceArray, rows: DeviceArray):
        """``write(position)``: ``write_position(cache, rows, position)``."""
        return lambda position: self.write_position(cache, rows, position)

    def write_position(self, cache: DeviceArray, rows: DeviceArray, position: int) -> None:
        b, hkv, s, d = cache.shape
        if not 0 <= position < s or rows.size != b * hkv * d or rows.dtype != cache.dtype:
            raise ValueError(f"cannot write {rows.shape} rows at position {position} of a cache of {cache.shape}")
        row = d * cache.dtype.itemsize
        self._copy_2d(cache.gpudata + position * row, s * row, rows.gpudata, row, row, b * hkv)

    def write_prompt(self, cache: DeviceArray, rows: DeviceArray, tokens: int) -> None:
        b, hkv, s, d = cache.shape  # transposed on the host: once per prompt
        if not 1 <= tokens <= s or rows.size != b * tokens * hkv * d or rows.dtype != cache.dtype:
            raise ValueError(f"cannot write {rows.shape} as {tokens} tokens into a cache of {cache.shape}")
        host = self.get(rows).reshape(b, tokens, hkv, d).transpose(0, 2, 1, 3).reshape(b * hkv, tokens * d)
        row = d * cache.dtype.itemsize
        self._copy_2d(cache.gpudata, s * row, np.ascontiguousarray(host), tokens * row, tokens * row, b * hkv)

    def split_columns(self, rows: DeviceArray, widths: tuple[int, ...]):
        """As ``HostArrays.split_columns``; the copies are ``cuMemcpy2D`` on the stream."""
        count, width = rows.shape
        edges = np.cumsum((0, *widths)).tolist()
        if count == 1:
            return [rows.part(a, (1, w)) for a, w in zip(edges, widths)], None
        parts = [self.empty((count, w), rows.dtype) for w in widths]
        item = rows.dtype.itemsize

        def split() -> None:
            for part, a, w in zip(parts, edges, widths):
                self._copy_2d(part.gpudata, w * item, rows.gpudata + a * item, width * item, w * item, count)
        return parts, split

    def rows_at(self, rows: DeviceArray, sequences: int, index: int, out: DeviceArray) -> DeviceArray:
        width = rows.shape[-1] * rows.dtype.itemsize
        per_sequence = rows.shape[0] // sequences
        if (rows.ndim != 2 or rows.shape[0] != per_sequence * sequences or not 0 <= index < per_sequence
                or out.size != sequences * rows.shape[-1] or out.dtype != rows.dtype):
            raise ValueError(f"cannot copy row {index} of {sequences} sequences in {rows.shape} into {out.shape}")
        self._copy_2d(out.gpudata, width, rows.gpudata + index * width, per_sequence * width, width, sequences)
        return out


# the memory of each target kind's kernels: host numpy arrays, or device arrays with copies on a stream
ARRAYS = {"cpu": lambda stream: HostArrays(), "cuda": CudaArrays}


def arrays_for(kind: str, stream=None):
    """The memory a model uses with kernels of this target kind (CUDA: copies on ``stream``,
    the kernels' stream)."""
    return ARRAYS[kind](stream)

"""Loading kernels into a busy process: MCJIT maps a kernel's code and its constants
separately, and with gigabytes mapped between small holes the two can land more than 2 GiB
apart. Such a load must still link (it used to abort on a relocation overflow)."""
import os
import subprocess
import sys

SCRIPT = r"""
import mmap
import numpy as np
from search_space import Target, Task
from search_space.registry import get_template
from measure.compile_llvm import compile_to_object
from measure import cpu_kernel

target = Target.host()
dims = {"M": 8, "N": 64, "K": 64}
task = Task.make("gemm", dims, "float32", {}, ())
template = get_template("gemm", "cpu")
source = template.render(task, template.default(task, target), target)
obj = compile_to_object(source.code, target)
pages = [mmap.mmap(-1, mmap.PAGESIZE) for _ in range(2000)]
for page in pages[::2]:
    page.close()                          # one-page holes high in the address space
far = np.empty(3 << 30, np.uint8)         # 3 GiB mapped below them (never touched)
out = next(a.name for a in source.args if a.role == "out")
for _ in range(20):
    kernel = cpu_kernel.load_object(obj, source, target)
    inputs = {a.name: np.ones(a.resolve_shape(dims), np.float32) for a in source.args if a.role == "in"}
    buffers = cpu_kernel.allocate_args(source, dims, inputs)
    kernel(buffers, dims)
    assert np.allclose(buffers[out], 64.0), buffers[out].ravel()[:4]
print("linked")
"""


def test_kernels_link_wherever_the_process_maps_their_sections(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "AUTOTUNE_CACHE_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "linked" in done.stdout

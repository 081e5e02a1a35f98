"""A sweep measures on any target the tuner does: here the CUDA one, on the fake GPU."""
from __future__ import annotations

import pytest

from records import RecordLog


def test_a_sweep_measures_its_sample_on_the_cuda_target(fake_gpu, tmp_path):
    from autotune.cli import main

    log = tmp_path / "sweep.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--op", "rmsnorm", "--shape", "M=2,N=256", "--target", "cuda", "--sample", "3", "--seed", "1",
              "--log", str(log), "--no-mlflow", "--quiet"])
    assert exit_info.value.code == 0
    records = RecordLog(log).records()
    assert len(records) == 3 and len({r.config_index for r in records}) == 3
    assert all(r.target.kind == "cuda" and r.ok for r in records), [r.error for r in records]

"""A checkpoint file that is not a regular file (a directory, a FIFO) is refused in one line,
before anything opens it: a directory failed to open (an internal error), a FIFO blocked
the open forever."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from fakes import no_hang

from runtime.model_config import PRESETS
from runtime.weights import ModelWeights, checkpoint_files, read_header

CLI = [sys.executable, "-m", "autotune.cli"]


def _not_a_file(path, kind: str) -> None:
    if kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)


@pytest.mark.parametrize("kind, said", [("directory", "a directory"), ("fifo", "not a regular file")])
def test_a_model_safetensors_that_is_not_a_file_is_refused(kind, said, tmp_path):
    _not_a_file(tmp_path / "model.safetensors", kind)
    with pytest.raises(ValueError, match=rf"^{tmp_path}/model\.safetensors: not a safetensors file \({said}\)$"):
        no_hang(lambda: ModelWeights.load(PRESETS["tiny"], tmp_path))


@pytest.mark.parametrize("kind, said", [("directory", "a directory"), ("fifo", "not a regular file")])
def test_a_shard_the_index_names_that_is_not_a_file_is_refused(kind, said, tmp_path):
    weights = ModelWeights.random(PRESETS["tiny"])
    weights.save(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "model-00001-of-00002.safetensors")
    _not_a_file(tmp_path / "model-00002-of-00002.safetensors", kind)
    names = sorted(weights.tensors)
    index = {"weight_map": {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert len(checkpoint_files(tmp_path)) == 2  # there, so not "not in the folder": refused for what it is
    with pytest.raises(ValueError, match=rf"model-00002-of-00002\.safetensors: not a safetensors file \({said}\)"):
        no_hang(lambda: ModelWeights.load(PRESETS["tiny"], tmp_path))


def test_a_file_that_cannot_be_read_is_a_value_error(tmp_path):
    (tmp_path / "gone.safetensors").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"^cannot read .*gone\.safetensors: No such file or directory$"):
        read_header(tmp_path / "gone.safetensors")


def test_a_folder_of_pytorch_pickles_only_says_they_are_not_read(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")  # a pickle runs code when loaded
    with pytest.raises(ValueError, match=r"only pytorch_model\.bin, a PyTorch pickle, which is not read"):
        checkpoint_files(tmp_path)


@pytest.mark.parametrize("kind, said", [("directory", "a directory"), ("fifo", "not a regular file")])
def test_run_with_weights_that_are_not_a_file_is_one_line_and_exit_2(kind, said, tmp_path):
    (tmp_path / "weights").mkdir()
    _not_a_file(tmp_path / "weights" / "model.safetensors", kind)
    (tmp_path / "empty.jsonl").write_text("")
    proc = subprocess.run(CLI + ["run", "--model", "tiny", "--weights", "weights", "--prompt-tokens", "4",
                                 "--new-tokens", "2", "--log", "empty.jsonl"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"autotune: error: weights/model.safetensors: not a safetensors file ({said})"]


def test_a_checkpoint_whose_tensors_hold_nan_or_inf_is_refused_when_asked(tmp_path):
    import numpy as np

    tiny = PRESETS["tiny"]
    weights = ModelWeights.random(tiny)
    weights.tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = np.nan
    weights.save(tmp_path / "f32")
    assert ModelWeights.load(tiny, tmp_path / "f32")  # not asked: loaded as it is
    with pytest.raises(ValueError, match=r"^weights of tiny: model\.layers\.1\.mlp\.down_proj\.weight hold NaN "
                                         r"or infinite values$"):
        ModelWeights.load(tiny, tmp_path / "f32", check_finite=True)
    ModelWeights.random(tiny).check_finite()  # finite ones pass


def test_run_check_weights_refuses_a_damaged_checkpoint_in_one_line(tmp_path):
    import numpy as np

    weights = ModelWeights.random(PRESETS["tiny"])
    weights.tensors["model.embed_tokens.weight"][0, 0] = np.inf
    weights.save(tmp_path / "weights")
    (tmp_path / "empty.jsonl").write_text("")
    run = CLI + ["run", "--model", "tiny", "--prompt-tokens", "4", "--new-tokens", "2", "--log", "empty.jsonl"]
    proc = subprocess.run(run + ["--weights", "weights", "--check-weights"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "autotune: error: weights of tiny: model.embed_tokens.weight hold NaN or infinite values"]
    proc = subprocess.run(run + ["--check-weights"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "--check-weights is for a checkpoint's weights" in proc.stderr, proc.stderr

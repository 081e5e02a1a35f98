"""tune-model and run from the command line, on real kernels of the tiny preset."""
from __future__ import annotations

import json

import pytest
from fakes import copied_store
from test_cli import assert_usage_error, run

from records import RecordLog


# two prefill sizes, so that a prompt can be shorter, longer or between them; 16 and 64 as in the
# other tiny jobs (q4 below, test_cli_model_bf16): their kernels of the same tasks come from the
# session's kernel cache
SIZES = ("--prefill-tokens", "16,128", "--decode-batch", "1", "--kv-len", "64")
TASKS = 30  # of the tiny preset at SIZES
TRIALS = TASKS + 2  # a trial for every task, and two the scheduler places


@pytest.fixture(scope="module")
def tiny_log(tmp_path_factory, mlflow_tables):
    """A tune-model job of the tiny preset, logged to a temporary MLflow store."""
    folder = tmp_path_factory.mktemp("tiny")
    copied_store(mlflow_tables, folder)
    proc = run("tune-model", "--model", "tiny", *SIZES, "--trials-total", str(TRIALS), "--batch", "4",
               "--log", "tiny.jsonl", "--quiet", "--json", "--tracking-uri", f"sqlite:///{folder}/mlflow.db",
               cwd=folder)
    (folder / "stderr.txt").write_text(proc.stderr)  # what the job said, for the tests of its lines
    return folder, json.loads(proc.stdout)


@pytest.fixture(scope="module")
def tiny_lib(tiny_log, tmp_path_factory):
    """The library `autotune export` makes of ``tiny_log`` (read-only for tests)."""
    folder, _ = tiny_log
    out = tmp_path_factory.mktemp("tiny-lib")
    run("export", "--log", str(folder / "tiny.jsonl"), "--out", str(out / "lib"), cwd=out)
    return out / "lib"


def test_tune_model_measures_every_task_within_the_budget(tiny_log):
    folder, summary = tiny_log
    records = RecordLog(folder / "tiny.jsonl").records()
    assert summary["trials"] == len(records) == TRIALS
    assert len(summary["tasks"]) == TASKS and all(t["trials"] >= 1 for t in summary["tasks"])
    assert all(t["best_ms"] > 0 for t in summary["tasks"])
    assert abs(sum(t["share"] for t in summary["tasks"]) - 1.0) < 1e-6
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    (run_info,) = client.search_runs(client.get_experiment_by_name("llm-autotune").experiment_id)
    assert run_info.data.params["model"] == "tiny" and run_info.data.params["tasks"] == str(TASKS)
    assert len(client.get_metric_history(run_info.info.run_id, "gflops")) == TRIALS
    assert {a.path for a in client.list_artifacts(run_info.info.run_id)} >= {"tiny.jsonl", "model_tasks.json"}


def test_a_resumed_tune_model_only_adds_trials(tiny_log, tmp_path):
    folder, _ = tiny_log
    log = tmp_path / "again.jsonl"
    log.write_text((folder / "tiny.jsonl").read_text())
    proc = run("tune-model", "--model", "tiny", *SIZES, "--trials-total", str(TRIALS + 2), "--batch", "4",
               "--log", str(log), "--quiet", "--no-mlflow", "--json", cwd=tmp_path)
    summary = json.loads(proc.stdout)
    assert summary["resumed"] == TRIALS and summary["measured"] == 2
    records = RecordLog(log).records()
    assert len({(r.task.key, r.config_index) for r in records}) == len(records) == TRIALS + 2


def test_a_resumed_tune_model_passes_over_records_of_code_it_no_longer_builds(tiny_log, tmp_path):
    """A task's fastest record, measured on code this version does not build (stale): the job
    neither reports it as the task's best nor ranks the task by it, and says so."""
    folder, _ = tiny_log
    lines = (folder / "tiny.jsonl").read_text().splitlines()
    records = RecordLog(folder / "tiny.jsonl").records()
    ok = {}
    for i, r in enumerate(records):
        if r.ok:
            ok.setdefault(r.task.key, []).append(i)
    key, rows = max(ok.items(), key=lambda item: len(item[1]))
    assert len(rows) >= 2, "the fixture's job gave no task a second verified record"
    fastest, *others = sorted(rows, key=lambda i: records[i].seconds)
    line = json.loads(lines[fastest])
    line["result"]["stats"]["digest"] = "0" * 32
    lines[fastest] = json.dumps(line)
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    proc = run("tune-model", "--model", "tiny", *SIZES, "--trials-total", str(TRIALS), "--log", "t.jsonl",
               "--quiet", "--no-mlflow", "--json", cwd=tmp_path)
    summary = json.loads(proc.stdout)
    assert summary["measured"] == 0 and summary["resumed"] == TRIALS  # stale records still count as measured
    (row,) = [t for t in summary["tasks"] if t["task"] == key]
    assert row["best_ms"] == pytest.approx(records[others[0]].seconds * 1e3)
    assert f"1 task(s) have faster records of code this version no longer builds (stale), passed over: {key} (1)" \
        in proc.stderr, proc.stderr
    assert "autotune tune --remeasure-stale --log t.jsonl" in proc.stderr


def test_tune_model_says_and_records_its_condition_and_warns_on_a_mixed_log(tiny_log, tmp_path, host):
    """tune-model times candidates cold or warm as the model runs them, and says which: in its
    lines, its summary and every record (``tiny_log``'s job, then two that resume it)."""
    from autotune import ModelWorkload
    from autotune.bench.model_run import tuned_condition
    from autotune.resume_notes import other_conditions
    from measure.timing import cache_condition
    from runtime.model_config import PRESETS
    from search_space.registry import op_definition

    folder, summary = tiny_log
    stderr = (folder / "stderr.txt").read_text()
    want = cache_condition(ModelWorkload(PRESETS["tiny"], (16, 128), (1,), (64,)).working_set_bytes(), host)
    other = "cold" if want == "warm" else "warm"
    # a trial for every task: weights (cycled) and activations (not) are both timed
    assert f"timing candidates {want}" in stderr and "one forward pass touches" in stderr
    # timed cold, the scheduler floors the weight-streaming tasks at a probed read rate, and says so
    assert ("memory reads at" in stderr) == (want == "cold")
    assert summary["cache"] == want and summary["working_set_bytes"] > 0
    records = RecordLog(folder / "tiny.jsonl").records()
    assert len(records) == TRIALS and {r.result.stats["cache"] for r in records if r.ok} == {want}
    cycled = [r for r in records if r.ok and r.result.stats.get("input_copies", 1) > 1]
    assert cycled and all(r.result.stats["cycle_bytes"] > 0 for r in cycled)
    # an operator with no weights (attention over the prompt) is timed on the inputs the kernel
    # before it wrote, not on copies
    activations_only = [r for r in records if r.ok and not op_definition(r.task.op).resident_inputs(r.task)]
    assert activations_only and not any("input_copies" in r.result.stats for r in activations_only)
    # records from before the samples went on through the cycle (no cycle_bytes) are not quite
    # the same condition: resuming them says so
    workload = ModelWorkload(PRESETS["tiny"], (16, 128), (1,), (64,), dynamic_rows=True)  # a CPU prefill: dynamic M
    keys = {t.key for t in workload.tasks()}

    def conditions(log) -> str:
        return other_conditions([r for r in RecordLog(log).records() if r.task.key in keys], want)

    assert conditions(folder / "tiny.jsonl") == ""
    lines = [json.loads(line) for line in (folder / "tiny.jsonl").read_text().splitlines()]
    for line in lines:
        line["result"]["stats"].pop("cycle_bytes", None)
    (tmp_path / "older.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    older = conditions(tmp_path / "older.jsonl")
    assert older.startswith(f"{len(cycled)} records timed {want} by the older cycle")
    (tmp_path / "t.jsonl").write_text((folder / "tiny.jsonl").read_text())
    common = ["tune-model", "--model", "tiny", *SIZES, "--batch", "2", "--log", "t.jsonl", "--no-mlflow", "--quiet",
              "--json"]
    proc = run(*common, "--trials-total", str(TRIALS + 1), "--cache", other, cwd=tmp_path)
    assert f"timing candidates {other}" in proc.stderr and "as --cache says" in proc.stderr
    assert ("memory reads at" in proc.stderr) == (other == "cold")
    assert f"records timed {want}" in proc.stderr and "mix both" in proc.stderr
    assert "other tuners" not in proc.stderr
    # another tuner's records among those resumed: said, as tune says it (timed as auto says: a
    # second run in the other condition would probe the memory again, for nothing checked here)
    proc = run(*common, "--trials-total", str(TRIALS + 2), "--tuner", "random", cwd=tmp_path)
    assert "measured by other tuners" in proc.stderr and "by xgb" in proc.stderr
    records = RecordLog(tmp_path / "t.jsonl").records()
    assert len(records) == TRIALS + 2  # each run's record says the condition it was timed in
    assert ([r.result.stats["cache"] for r in records[TRIALS:] if r.ok]
            == [condition for r, condition in zip(records[TRIALS:], (other, want)) if r.ok])
    assert tuned_condition(logs=[str(tmp_path / "t.jsonl")]) in (want, "cold+warm", other)


def test_run_on_the_tuned_log_matches_the_reference_and_the_defaults(tiny_log):
    folder, _ = tiny_log
    proc = run("run", "--log", "tiny.jsonl", "--model", "tiny", "--prompt-tokens", "11", "--new-tokens", "6",
               "--compare", "--json", cwd=folder)
    out = json.loads(proc.stdout)
    # a pass uses one prefill size's kernels: 20 of the log's 30 tasks
    assert out["kernels"]["tuned"] == 20 and out["kernels"]["untuned"] == 0
    assert out["kernels"]["prefill_padded_to"] == 11  # its own length: the prefill GEMMs read M at run time
    assert len(out["token_ids"][0]) == 6
    for side in ("reference", "defaults"):
        assert out[side]["logits"]["max_rel"] < 1e-4, side
        assert out[side]["logits"]["same_tokens"], side
        assert out[f"decode_speedup_vs_{side}"] > 0
    assert out["decode_tokens_per_s"] > 0 and out["reference"]["blas"]["internal_api"] == "openblas"


def test_q4_model_tunes_and_runs_against_the_dequantised_reference(tmp_path):
    run("tune-model", "--model", "tiny", "--quantize", "q4", "--group-size", "32", "--prefill-tokens", "16",
        "--kv-len", "64", "--trials-total", "21", "--batch", "2", "--log", "q4.jsonl", "--quiet", "--no-mlflow",
        "--repeats", "3", cwd=tmp_path)
    records = RecordLog(tmp_path / "q4.jsonl").records()
    ops = {r.task.op for r in records}
    assert {"gemm_q4", "gemv_q4"} <= ops and not ops & {"gemm", "gemv"}
    assert {r.result.stats["repeats"] for r in records if r.ok} == {3}  # --repeats, in place of the 7 of a model job
    out = json.loads(run("run", "--log", "q4.jsonl", "--model", "tiny", "--prompt-ids", "5,6,7,8,9",
                         "--new-tokens", "4", "--compare", "--json", cwd=tmp_path).stdout)
    # q4 and its group of 32 come from the kernels: packed at the default 128, none of them would run
    assert out["quantize"] == "q4" and out["kernels"]["untuned"] == 0, out["kernels"]
    assert out["reference"]["logits"]["max_rel"] < 1e-4 and out["reference"]["logits"]["same_tokens"]


@pytest.mark.parametrize("args, message", [
    (["tune-model", "--model", "no-such-model"], "not a preset"),
    (["tune-model", "--model", "no/such/config.json"], "model config no/such/config.json does not exist"),
    (["tune-model", "--model", "."], "model folder . has no config.json"),
    (["tune-model", "--model", "tiny", "--threads", "4096"], "--threads 4096: "),
    (["run", "--model", "tiny", "--lib", "lib", "--target", "bogus"], "unknown target 'bogus'"),
    (["tune-model", "--model", "tiny", "--prefill-tokens", "12,x"], "malformed --prefill-tokens"),
    (["tune-model", "--model", "tiny", "--kv-len", "64,64"], "names a size twice"),
    (["tune-model", "--model", "tiny", "--trials-total", "0"], "--trials-total must be >= 1"),
    (["tune-model", "--model", "tiny", "--log", "/no/such/dir/x.jsonl"], "does not exist"),
    (["run", "--model", "tiny"], "either --lib DIR"),
    (["run", "--model", "tiny", "--lib", "/no/such/lib"], "no manifest.json"),
    (["run", "--model", "tiny", "--log", "/no/such/log.jsonl"], "does not exist"),
    (["run", "--model", "tiny", "--lib", "lib", "--mmap"], "--mmap is for a checkpoint's weights"),
    (["run", "--model", "tiny", "--lib", "lib", "--weights", ".", "--random-weights"],
     "--random-weights and --weights: give one"),
    (["tune-model", "--model", "tiny-moe", "--target", "cuda"], "tiny-moe is a mixture of experts, which runs on "
                                                                "CPU kernels only: use --target cpu"),
])
def test_bad_model_input_is_one_line_and_exit_2(args, message, tmp_path):
    assert_usage_error(run(*args, cwd=tmp_path, check=False), message)


def test_q4_needs_dims_that_are_multiples_of_the_group(tmp_path):
    config = {"hidden_size": 96, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 1,
              "vocab_size": 50}
    (tmp_path / "config.json").write_text(json.dumps(config))
    proc = run("tune-model", "--model", str(tmp_path / "config.json"), "--quantize", "q4", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "not a multiple of the group size 128" in proc.stderr


DEPLOYED_MODEL = """
import json, sys
import numpy as np
import runtime
from runtime.llama import LlamaModel
from runtime.model_config import load_model_config
from runtime.weights import ModelWeights

config = load_model_config("tiny")
with runtime.load(sys.argv[1]) as library:
    out = LlamaModel(config, ModelWeights.random(config, seed=7), library).generate(np.array([[3, 1, 4, 1, 5]]), 4)
heavy = ("search_space", "measure", "records", "autotune", "cost_model", "llvmlite", "xgboost", "optuna", "mlflow")
print(json.dumps({"tokens": out.tokens.tolist(), "logits": out.logits.tolist(),
                  "imported": sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in heavy})}))
"""


@pytest.mark.tools("cc")
def test_the_exported_library_runs_the_model_with_numpy_only(tiny_lib, tmp_path):
    """tune-model, export (``tiny_lib``), then run in a process that has numpy and the runtime and
    nothing else."""
    import numpy as np
    from fakes import run_numpy_only

    from runtime.model_config import PRESETS
    from runtime.reference import ReferenceModel
    from runtime.weights import ModelWeights

    out = json.loads(run("run", "--lib", str(tiny_lib), "--model", "tiny", "--prompt-tokens", "12", "--new-tokens",
                         "5", "--compare", "--json", cwd=tmp_path).stdout)
    assert out["kernels"] == {"tuned": 20, "untuned": 0, "prefill_padded_to": 12, "decode_mode": "host"}
    assert out["reference"]["logits"]["max_rel"] < 1e-4 and out["reference"]["logits"]["same_tokens"]
    proc = run_numpy_only(tmp_path, DEPLOYED_MODEL, str(tiny_lib))
    assert proc.returncode == 0, proc.stderr
    deployed = json.loads(proc.stdout)
    assert deployed["imported"] == []
    reference = ReferenceModel(PRESETS["tiny"], ModelWeights.random(PRESETS["tiny"], seed=7)).generate(
        np.array([[3, 1, 4, 1, 5]]), 4)
    logits = np.asarray(deployed["logits"])
    assert np.abs(logits - reference.logits).max() / np.abs(reference.logits).max() < 1e-4
    assert deployed["tokens"] == reference.tokens.tolist()


def test_list_tasks_names_every_kernel_of_a_preset_with_its_uses(tmp_path):
    rows = json.loads(run("tune-model", "--model", "llama-2-7b", "--prefill-tokens", "128,512", "--decode-batch",
                          "1,8", "--kv-len", "512,4096", "--list-tasks", "--json", cwd=tmp_path).stdout)
    by_key = {r["task"]: r for r in rows}
    assert len(by_key) == len(rows)
    # the MLP's down projection in a 512-token prefill: a CPU prefill's GEMMs read M at run time
    down = by_key["gemm/float32/M~=512,N=4096,K=11008"]
    assert down["calls_per_pass"] == {"prefill T=512": 32} and down["weight"] == 32
    assert "gemm/float32/M~=128,N=4096,K=11008" in by_key  # each prefill size is a bucket of its own
    attention = [r for r in rows if r["op"] == "attention_decode"]
    assert len(attention) == 4  # two batch sizes x two KV lengths
    assert not (tmp_path / "tune.jsonl").exists()  # nothing was tuned


@pytest.mark.tools("cc")
def test_a_prompt_of_any_length_runs_tuned_kernels_only(tiny_lib, tmp_path):
    """On the CPU a prefill's GEMMs read their M at run time, so a prompt of any length, shorter,
    longer or between the sizes the model was tuned at (16 and 128 tokens, ``tiny_lib``), runs at
    its own length on tuned kernels (each GEMM from the nearest tuned size), with no padding."""
    # one token (a prefill of one row), shorter, between (nearer 16, nearer 128), longer
    for tokens, padded in ((1, 1), (3, 3), (17, 17), (100, 100), (200, 200)):
        proc = run("run", "--lib", str(tiny_lib), "--model", "tiny", "--prompt-ids", ",".join(["7"] * tokens),
                   "--new-tokens", "2", "--json", cwd=tmp_path)
        out = json.loads(proc.stdout)
        assert "UntunedShapeWarning" not in proc.stderr and "not in the kernel library" not in proc.stderr, tokens
        assert out["kernels"]["untuned"] == 0 and out["kernels"]["prefill_padded_to"] == padded, (tokens, out["kernels"])


def _word_tokenizer(path, words: dict[str, int]):
    """A tokenizer.json of whole words (``tokenizers``' WordLevel model, split on whitespace)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return tokenizer


def test_a_text_prompt_runs_through_the_checkpoints_tokenizer(tiny_lib, tmp_path):
    """--prompt is encoded by the tokenizer.json beside the weights (or --tokenizer) and the
    generated ids come back as text; what it refuses, it says in one line."""
    words = {"<unk>": 0, **{f"w{i}": i for i in range(1, 512)}}
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    tokenizer = _word_tokenizer(folder / "tokenizer.json", words)
    out = json.loads(run("run", "--lib", str(tiny_lib), "--model", "tiny", "--tokenizer", str(folder),
                         "--prompt", "w5 w6 w7", "--new-tokens", "4", "--json", cwd=tmp_path).stdout)
    assert out["prompt_tokens"] == 3 and out["prompt_text"] == "w5 w6 w7"
    assert out["texts"] == [tokenizer.decode(out["token_ids"][0], skip_special_tokens=False)]
    assert out["texts"][0].split() == [f"w{i}" if i else "<unk>" for i in out["token_ids"][0]]
    # the same ids as --prompt-ids gives the same tokens
    same = json.loads(run("run", "--lib", str(tiny_lib), "--model", "tiny", "--prompt-ids", "5,6,7",
                          "--new-tokens", "4", "--json", cwd=tmp_path).stdout)
    assert same["token_ids"] == out["token_ids"] and "texts" not in same
    text = run("run", "--lib", str(tiny_lib), "--model", "tiny", "--tokenizer", str(folder / "tokenizer.json"),
               "--prompt", "w5 w6 w7", "--new-tokens", "4", cwd=tmp_path).stdout
    assert 'prompt: "w5 w6 w7"' in text and f"text: {json.dumps(out['texts'][0])}" in text

    _word_tokenizer(tmp_path / "wide.json", {"<unk>": 0, "w1": 1, "far": 600})
    (tmp_path / "broken.json").write_text("{not json")
    lib = ["run", "--lib", str(tiny_lib), "--model", "tiny"]
    for args, message in (
        (["--prompt", "w1"], "--prompt needs the checkpoint's tokenizer.json: --model tiny is a preset and "
                             "no --weights"),
        (["--prompt", "w1", "--weights", str(tmp_path)], f"none in {tmp_path}; give --tokenizer PATH"),
        (["--prompt", "w1", "--prompt-ids", "1", "--tokenizer", str(folder)], "give --prompt or --prompt-ids"),
        (["--tokenizer", str(folder)], "--tokenizer is for --prompt"),
        (["--prompt", "w1", "--tokenizer", str(tmp_path / "none.json")], "none.json: no such file"),
        (["--prompt", "w1", "--tokenizer", "/dev/null"], "--tokenizer /dev/null: not a regular file"),
        (["--prompt", "w1", "--tokenizer", str(tmp_path / "broken.json")],
         "is not a tokenizer.json the tokenizers"),
        (["--prompt", "w1 far", "--tokenizer", str(tmp_path / "wide.json")], "gives token id 600, past the model's "
                                                                              "vocabulary of 512"),
        (["--prompt", " ", "--tokenizer", str(folder)], "--prompt ' ' encodes to no tokens"),
    ):
        assert_usage_error(run(*lib, *args, cwd=tmp_path, check=False), message)


def test_the_text_ends_at_the_checkpoints_end_of_sequence_token(tiny_lib, tmp_path):
    """The generation stops at the first id the checkpoint's generation_config.json (or
    config.json) names as its end, and the text with it; --ignore-eos generates every new token
    (the text still ends there)."""
    from runtime.model_config import PRESETS

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(PRESETS["tiny"].to_hf_dict()))
    tokenizer = _word_tokenizer(folder / "tokenizer.json", {"<unk>": 0, **{f"w{i}": i for i in range(1, 512)}})
    args = ("run", "--lib", str(tiny_lib), "--model", str(folder), "--prompt", "w5 w6 w7", "--new-tokens", "6")
    first = json.loads(run(*args, "--json", cwd=tmp_path).stdout)
    tokens = first["token_ids"][0]
    assert first["ended_at"] == [None] and first["texts"] == [tokenizer.decode(tokens)]
    at = min(i for i, token in enumerate(tokens) if i and token not in tokens[:i])  # the first new id after one
    # an id past the vocabulary ends nothing
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [100000, tokens[at]]}))
    ended = json.loads(run(*args, "--json", cwd=tmp_path).stdout)
    assert ended["token_ids"] == [tokens[:at + 1]] and ended["ended_at"] == [at]
    assert ended["generated_tokens"] == at + 1 and ended["stop_ids"] == [tokens[at]]
    assert ended["texts"] == [tokenizer.decode(tokens[:at + 1])]
    text = run(*args, cwd=tmp_path).stdout
    assert f"(end of sequence at new token {at + 1} of 6)" in text
    assert f"ended: every sequence at an end-of-sequence id, after {at + 1} of 6 new tokens" in text
    every = json.loads(run(*args, "--ignore-eos", "--json", cwd=tmp_path).stdout)
    assert every["token_ids"] == first["token_ids"] and every["ended_at"] == [at] and every["stop_ids"] == []
    # a random prompt is a benchmark: every new token
    bench = json.loads(run(*args[:5], "--new-tokens", "6", "--json", cwd=tmp_path).stdout)
    assert bench["generated_tokens"] == 6 and bench["stop_ids"] == []


def test_run_samples_with_a_temperature_repeatably_and_compares_like_for_like(tiny_lib, tmp_path):
    """--temperature draws the tokens (seeded by --seed), the same ones on the tuned kernels and
    in the numpy reference of --compare; the cuts need a temperature; bad values are one line."""
    base = ["run", "--lib", str(tiny_lib), "--model", "tiny", "--prompt-ids", "5,6,7", "--new-tokens", "8", "--json"]
    greedy = json.loads(run(*base, cwd=tmp_path).stdout)
    assert greedy["sampling"] is None
    sampled = json.loads(run(*base, "--temperature", "1.5", "--top-k", "50", "--seed", "3", "--compare",
                             cwd=tmp_path).stdout)
    assert sampled["sampling"] == {"temperature": 1.5, "top_k": 50, "top_p": 1.0, "seed": 3}
    assert sampled["token_ids"] != greedy["token_ids"]
    assert sampled["reference"]["logits"]["same_tokens"] and sampled["defaults"]["logits"]["same_tokens"]
    again = json.loads(run(*base, "--temperature", "1.5", "--top-k", "50", "--seed", "3", cwd=tmp_path).stdout)
    assert again["token_ids"] == sampled["token_ids"]
    text = run(*base[:-1], "--temperature", "0.7", "--top-p", "0.9", cwd=tmp_path).stdout
    assert "sampling: temperature 0.7, top-k off, top-p 0.9, seed 0" in text
    for args, message in ((["--top-k", "5"], "--top-k is for sampling: give --temperature above 0 too"),
                          (["--top-p", "0.5"], "--top-p is for sampling: give --temperature above 0 too"),
                          (["--temperature", "-1"], "--temperature must be a number > 0, not -1.0"),
                          (["--temperature", "1", "--top-p", "2"], r"--top-p must be a number in (0, 1]"),
                          (["--temperature", "1", "--top-k", "-3"], "--top-k must be an int >= 0")):
        assert_usage_error(run(*base, *args, cwd=tmp_path, check=False), message)


def test_run_chat_generates_from_the_templated_prompt(tiny_lib, tmp_path):
    """--chat lays the prompt out by the template beside the tokenizer; the JSON says the text
    that was encoded. Without --prompt, or without a template, one line and exit 2."""
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    from test_chat_template import GEMMA_STYLE, _checkpoint_tokenizer

    _checkpoint_tokenizer(folder, GEMMA_STYLE, legacy=False)
    base = ["run", "--lib", str(tiny_lib), "--model", "tiny", "--new-tokens", "3", "--json"]
    out = json.loads(run(*base, "--tokenizer", str(folder), "--prompt", "hi", "--chat", cwd=tmp_path).stdout)
    assert out["prompt_text"] == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    plain = json.loads(run(*base, "--tokenizer", str(folder), "--prompt", "hi", cwd=tmp_path).stdout)
    assert out["prompt_tokens"] > plain["prompt_tokens"] == 3  # <bos> h i
    assert_usage_error(run(*base, "--chat", cwd=tmp_path, check=False), "--chat is for --prompt")
    assert_usage_error(run(*base, "--tokenizer", str(folder), "--prompt", "hi", "--system", "x", cwd=tmp_path,
                           check=False), "--system is for --chat")
    (folder / "chat_template.jinja").unlink()
    assert_usage_error(run(*base, "--tokenizer", str(folder), "--prompt", "hi", "--chat", cwd=tmp_path, check=False),
                       "--chat: no chat template beside")


def test_a_mixture_of_experts_checkpoint_tunes_and_runs_with_the_references_tokens(tmp_path):
    """A Mixtral checkpoint (the tiny-moe preset's dims and random weights, its tensors under
    Mixtral's names) from the command line: tune-model tunes its router's and experts' kernels
    (GEMVs of one row for a decode step, gemms of the rows an expert gets for a prefill), and run
    generates the numpy reference's tokens on them, from the checkpoint's files mapped into memory."""
    from runtime.model_config import PRESETS
    from runtime.weights import ModelWeights

    ModelWeights.random(PRESETS["tiny-moe"], seed=1).save(tmp_path / "mixtral")
    assert json.loads((tmp_path / "mixtral/config.json").read_text())["model_type"] == "mixtral"
    sizes = ("--prefill-tokens", "24", "--decode-batch", "1", "--kv-len", "64")
    tasks = json.loads(run("tune-model", "--model", "mixtral", *sizes, "--list-tasks", "--json", cwd=tmp_path).stdout)
    # each expert's projections (their N and K all 128): a prefill's 48 picks over 8 experts
    assert "gemm/float32/M~=6,N=128,K=128" in {t["task"] for t in tasks}
    run("tune-model", "--model", "mixtral", *sizes, "--trials-total", str(len(tasks)), "--log", "moe.jsonl", "--quiet",
        "--no-mlflow", cwd=tmp_path)
    # the folder given as --model holds the checkpoint: its weights are the run's (no --weights needed)
    out = json.loads(run("run", "--log", "moe.jsonl", "--model", "mixtral", "--mmap", "--prompt-tokens", "24",
                         "--new-tokens", "8", "--compare", "--json", cwd=tmp_path).stdout)
    assert out["kernels"]["untuned"] == 0 and out["weights"] == "mixtral", out
    assert out["reference"]["logits"]["max_rel"] < 1e-4 and out["reference"]["logits"]["same_tokens"]

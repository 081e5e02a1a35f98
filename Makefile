# Two entry points on a fresh machine; each installs what it needs into .venv first.
#   make demo   tune gemm and gemv on this CPU (xgb), log to a local MLflow store, print best + bench;
#               then tune, export and run the tiny model against numpy and the untuned defaults,
#               the tiny model with bfloat16 weights, and the tiny model with a mixture of experts
#   make test   run the test suite (the test extra brings torch and transformers to compare with)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install demo test bench clean check-cc

# The project and what it runs on, byte-compiled as pip does by default: all that `make demo` and
# the `autotune` command need
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# then the extras that only the tests and a Ray cluster use (torch, transformers, ray: 1 GB, most
# of the install's bytes), for `make test` only, without bytecode, which halves their install's
# time: the modules of theirs that are imported are compiled then, once (make test writes bytecode
# even where the environment says not to)
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile -e '.[dev,test,ray]'
	touch $(TEST_STAMP)

install: $(TEST_STAMP)

# export links the CPU kernels into a shared library with the system C compiler: say so before anything runs
check-cc:
	@for c in "$${CC%% *}" cc gcc clang; do [ -n "$$c" ] && command -v "$$c" >/dev/null 2>&1 && exit 0; done; \
	echo "make demo: no C compiler found (tried \$$CC, cc, gcc, clang); autotune export needs one to link the kernels: install gcc (apt-get install gcc) or set CC" >&2; \
	exit 2

demo: check-cc $(STAMP)
	$(BIN)/autotune tune --op gemm --shape M=256,N=256,K=256 --tuner xgb --trials 48 --log demo.jsonl
	$(BIN)/autotune tune --op gemv --shape M=1,N=4096,K=4096 --tuner xgb --trials 32 --log demo.jsonl
	$(BIN)/autotune best --log demo.jsonl
	$(BIN)/autotune bench --op gemm --shape M=256,N=256,K=256 --log demo.jsonl
	$(BIN)/autotune bench --op gemv --shape M=1,N=4096,K=4096 --log demo.jsonl
	$(BIN)/autotune tune-model --model tiny --dtype float32 --trials-total 60 --log demo-model.jsonl
	$(BIN)/autotune export --log demo-model.jsonl --out demo-lib
	$(BIN)/autotune run --lib demo-lib --model tiny --compare
	# the same model with bfloat16 weights on this CPU (weight-only: half the bytes, float32 arithmetic)
	$(BIN)/autotune tune-model --model tiny --dtype bfloat16 --trials-total 21 --log demo-model-bf16.jsonl
	$(BIN)/autotune run --log demo-model-bf16.jsonl --model tiny --compare
	# 21 trials for the tiny model's 20 tasks: nearly every kernel runs its template default, so
	# tuned against defaults above is timing noise; the float32 run's 60 trials tune them
	# the same model in float16 on a GPU: its tasks (listing them needs no GPU)
	$(BIN)/autotune tune-model --model tiny --target cuda --dtype float16 --list-tasks
	# the tiny model with a mixture of experts (8 experts, 2 a token, Mixtral's routing) on this CPU
	$(BIN)/autotune tune-model --model tiny-moe --trials-total 40 --log demo-model-moe.jsonl
	$(BIN)/autotune run --log demo-model-moe.jsonl --model tiny-moe --compare
	@echo
	@echo "make demo wrote: demo.jsonl (gemm, gemv), demo-model.jsonl, demo-model-bf16.jsonl and"
	@echo "demo-model-moe.jsonl (the tiny models' kernels): tuning logs, one record per measurement;"
	@echo "demo-lib/ (the tuned-kernel library: shared object, C header, manifest); mlflow.db and"
	@echo "mlartifacts/ (the MLflow store: one run per job)."
	@echo "Next: source $(BIN)/activate, then autotune best --log demo.jsonl; autotune --help;"
	@echo "mlflow ui --backend-store-uri sqlite:///mlflow.db; the notebooks in notebooks/ read demo.jsonl."

# three workers, each test file kept on one (module fixtures compile kernels once), the longest
# files first (tests/conftest.py: LONGEST_FIRST); no assertion rests on quiet timings, so nothing
# needs to run alone. Three on two cores: much of the suite waits on the processes it starts
# (8:59 on two workers, 8:11 and 8:19 on three, 1,305 tests; 6:20 on three once the slowest files repeated less, 1,314 tests, 2026-12-07). The suite starts about 700 Python processes (CLI runs, build and run
# workers): bytecode is written even where the environment says not to (PYTHONDONTWRITEBYTECODE),
# or each of them compiles the project's modules again
test: $(TEST_STAMP)
	PYTHONDONTWRITEBYTECODE= MLFLOW_DISABLE_TELEMETRY=true $(BIN)/python -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder

bench: $(STAMP)
	$(BIN)/python benchmarks/cpu_ops.py --markdown

clean:
	rm -rf $(VENV) demo.jsonl demo-model.jsonl demo-model-bf16.jsonl demo-lib mlflow.db mlartifacts .pytest_cache \
		notebooks/notebook-plots

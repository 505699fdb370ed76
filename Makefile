# The two commands of the README. Each does all set-up on a fresh clone (a .venv with pinned torch).
PYTHON ?= python3
SEEDS ?= 20240930 1 2
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# DVC stages call `python`: the one in the project venv.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: repro test test-fast params results bench retrain compare seeds plots
repro: $(STAMP)  ## run the whole study (dvc repro) on the embedded default data
	$(BIN)/dvc repro

test: $(STAMP)  ## the whole test suite, the smoke end-to-end `dvc repro` included
	$(BIN)/python -m pytest

test-fast: $(STAMP)  ## unit tests only
	$(BIN)/python -m pytest -m "not slow"

params: $(STAMP)  ## compose conf/ into params.yaml (as `dvc exp run` does); e.g. make params ARGS=profile=smoke
	$(BIN)/python -m pipeline.config $(ARGS)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

results: $(STAMP)  ## rewrite the README's Results section and docs/ sample from the last `dvc repro`
	$(BIN)/python -m pipeline.evaluation.results

bench: $(STAMP)  ## benchmarks after `make repro`: quality on ../shared/data/testsets, speed, storage -> README
	$(BIN)/python -m benchmarks --readme $(ARGS)

plots: $(STAMP) .plots/node_modules  ## `dvc plots show` with the chart libraries inlined: reports/plots_html/index.html works offline
	$(BIN)/python -m pipeline.evaluation.offline_plots

.plots/node_modules: pipeline/evaluation/offline_plots.py  # set-up: the versions DVC's page loads from a CDN
	npm install --silent --no-save --no-audit --no-fund --prefix .plots \
		$$($(BIN)/python -c "from pipeline.evaluation.offline_plots import LIBRARIES; print(' '.join(f'{k}@{v}' for k, v in LIBRARIES.items()))")
	touch .plots/node_modules

compare: $(STAMP)  ## the experiments of this commit side by side: changed params and headline metrics
	$(BIN)/python -m pipeline.evaluation.compare $(ARGS)

seeds: $(STAMP)  ## the whole study once per seed (DVC experiments, workspace untouched), then mean ± std (and README Results)
	for s in $(SEEDS); do $(BIN)/dvc exp run --temp -S seed=$$s $(ARGS) || exit 1; done
	$(BIN)/python -m pipeline.evaluation.compare --over-seeds
	$(BIN)/python -m pipeline.evaluation.results --over-seeds

retrain: $(STAMP)  ## what CI's retrain workflow runs: pull, repro or exp run -S $$SET_PARAMS, push, metrics diff
	scripts/retrain.sh

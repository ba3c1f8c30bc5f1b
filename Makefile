# make demo: set up .venv and run the main job on the built-in sample data.
# make test: set up .venv and run the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := runs/demo
SAMPLE := tirsynth/sample

.PHONY: demo test bench lint clean

$(BIN)/tirsynth: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch/torchvision pinned to the releases this machine holds on disk (no download).
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/tirsynth
	$(BIN)/tirsynth ingest $(SAMPLE)/roadscene --meta $(SAMPLE)/roadscene-daynight.csv \
		--split 0.5,0.25,0.25 --out $(DEMO)/data
	$(BIN)/tirsynth info $(DEMO)/data

test: $(BIN)/tirsynth
	$(BIN)/python -m pytest -q

bench: $(BIN)/tirsynth
	$(BIN)/tirsynth bench ingest ../shared/data/roadscene ../shared/data/llvip \
		--meta ../shared/data/roadscene-daynight.csv --repeat 10
	$(BIN)/tirsynth bench train
	$(BIN)/tirsynth bench generate

lint: $(BIN)/tirsynth
	$(BIN)/ruff check tirsynth tests && $(BIN)/ruff format --check tirsynth tests

clean:
	rm -rf $(VENV) runs *.egg-info

# make demo: set up .venv and run the main job on the built-in sample data.
# make test: set up .venv and run the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test figure bench lint clean chromium

$(BIN)/tirsynth: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch/torchvision pinned to the releases this machine holds on disk (no download).
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/tirsynth
	$(BIN)/tirsynth pipeline run pipelines/demo.yaml

test: $(BIN)/tirsynth chromium
	$(BIN)/python -m pytest -q

# Headless Chromium (Debian's package) for the test that renders the HTML reports; without
# root and apt-get that test is skipped with a message.
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } \
		|| echo "chromium is not installed: the report rendering test will be skipped"

# The README's figures: held-out pairs (two built-in sample pairs the built-in model never
# saw, a frame of the M3SVD clip kept out of its training) at their own resolution; with
# OLD_MODEL set (a file), also the built-in model beside the one it replaced.
SAMPLE := tirsynth/sample/roadscene
M3SVD := ../shared/data/m3svd
FIGURE_MODEL ?= tirsynth/builtin/sparse_plus_half.safetensors
FIGURE_PAIRS = --pair $(SAMPLE)/crop_LR_visible/FLIR_03801.jpg $(SAMPLE)/cropinfrared/FLIR_03801.jpg \
	--pair $(SAMPLE)/crop_LR_visible/FLIR_06506.jpg $(SAMPLE)/cropinfrared/FLIR_06506.jpg \
	--pair "$(M3SVD)/visible/1230_1202.mp4\#frame=100" "$(M3SVD)/infrared/1230_1202.mp4\#frame=100"
figure: $(BIN)/tirsynth
	$(BIN)/tirsynth figure --out docs/results.png --checkpoint $(FIGURE_MODEL) $(FIGURE_PAIRS)
	$(if $(OLD_MODEL),$(BIN)/tirsynth figure --out docs/builtin-old-new.png \
		--checkpoint $(OLD_MODEL) --compare $(FIGURE_MODEL) $(FIGURE_PAIRS))

bench: $(BIN)/tirsynth
	$(BIN)/tirsynth bench ingest ../shared/data/roadscene ../shared/data/llvip \
		--meta ../shared/data/roadscene-daynight.csv --repeat 10
	$(BIN)/tirsynth bench train
	$(BIN)/tirsynth bench generate
	$(BIN)/tirsynth bench generate-scale

lint: $(BIN)/tirsynth
	$(BIN)/ruff check tirsynth tests && $(BIN)/ruff format --check tirsynth tests

clean:
	rm -rf $(VENV) runs *.egg-info

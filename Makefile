# Every target creates .venv and installs what it needs on a fresh machine.
# torch goes in first (CPU wheel by default) so that no dependency pulls a CUDA build;
# override with e.g. `make test TORCH_SPEC="torch==2.5.1"`.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp

.PHONY: install chromium demo test test-slow lint format compare long bench gpu-check-dry screenshot clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,data,ocr]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)  ## pretrain (or reuse) the base, train DDRL + baselines, evaluate (< 10 min on 2 cores)
	$(VENV)/bin/ddrl demo --out runs/demo --overwrite

# Debian's headless Chromium for tests/test_vote_browser.py, installed when missing and
# possible (root with apt-get); without it that test is skipped, saying why.
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } || echo "make: no chromium: tests/test_vote_browser.py will be skipped"

test: $(STAMP) chromium  ## fast suite (slow runs are marked and excluded)
	$(PY) -m pytest -q

test-slow: $(STAMP)  ## the slow suite: full demo end to end
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests
	$(VENV)/bin/ruff format src tests

compare: $(STAMP)  ## the full reward-hacking comparison (ink + classifier, ~25-50 min on 2 cores)
	$(VENV)/bin/ddrl compare --out runs/compare --overwrite

long: $(STAMP)  ## slow: DDRL vs Flow-GRPO for 200 iterations, 2 rewards x 2 seeds (~70 min on 2 cores)
	$(VENV)/bin/ddrl long --out runs/long --overwrite

bench: $(STAMP)  ## phase times vs the model's own compute, every algorithm (see docs/BENCHMARKS.md)
	mkdir -p runs
	$(VENV)/bin/ddrl bench --json runs/bench-digits.json
	$(VENV)/bin/ddrl bench --preset tiny-sd3 --algorithms ddrl,flow_grpo,nft --json runs/bench-tiny-sd3.json

gpu-check-dry: $(STAMP)  ## benchmarks/gpu_check.sh at toy size on the CPU (the GPU check's code path)
	PYTHON=$(VENV)/bin/python benchmarks/gpu_check.sh runs/gpu-check-dry --dry --skip compile

screenshot: $(STAMP)  ## the quick comparison's report as a headless-Chromium PNG (runs/compare-quick.png) to look at
	test -f runs/compare-quick/report.html || $(VENV)/bin/ddrl compare --quick --out runs/compare-quick
	benchmarks/screenshot_report.sh runs/compare-quick runs/compare-quick.png

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

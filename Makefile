# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing. torch comes from the machine's CPU wheel (TORCH_WHEELS, installed
# with --no-index so a missing wheel fails here instead of pulling the multi-GB CUDA build from PyPI).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
TORCH_WHEELS ?= /opt/wheels
SWIFT ?= $(shell command -v swift 2>/dev/null || echo /opt/swift/usr/bin/swift)
SWIFT_PACKAGE := ios_bridge/MiniCPMKit
VECTORS := out/vectors

.PHONY: venv demo test test-python test-swift vectors fuzz bench bench-full bench-hybrid-full lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@test -d $(TORCH_WHEELS) || { echo "error: no CPU torch wheel directory $(TORCH_WHEELS) (set TORCH_WHEELS=DIR)"; exit 2; }
	$(PY) -m pip install -q --no-index --find-links $(TORCH_WHEELS) --no-deps torch==2.13.0
	$(PY) -m pip install -q --find-links $(TORCH_WHEELS) torch==2.13.0
	$(PY) -m pip install -q --find-links $(TORCH_WHEELS) -e ".[dev]"
	@$(PY) -c "import torch, sys; sys.exit(0 if torch.version.cuda is None else 'error: a CUDA torch build got installed')"
	@rm -f $(VENV)/.installed-*
	@touch $@

DEMO := out/demo
DEMO_QUESTION := What is in this image?

# The device configuration end to end on the embedded tiny model (random weights: its words mean nothing):
# int4 AWQ records, ONNX export (parity table), an answer through the export's own runtime (onnxruntime),
# and one line comparing its greedy tokens with the eager torch reference of the same int4 weights.
demo: venv
	$(PY) -m quant.awq --model tiny-minicpm-v-4 --out $(DEMO)/tiny-minicpm-v-4-awq --samples 16 --overwrite
	$(PY) -m export.onnx --model $(DEMO)/tiny-minicpm-v-4-awq --out $(DEMO)/tiny-minicpm-v-4-onnx
	@echo "tiny-minicpm-v-4 has random weights: the answer is meaningless words; the parity line is the point."
	$(PY) -m runtime.generate --artifacts $(DEMO)/tiny-minicpm-v-4-onnx --image examples/house.png \
		--prompt "$(DEMO_QUESTION)" --max-new-tokens 32 --parity

# Everything: the Python suite, then the Swift package replaying the Python side's conformance vectors.
test: test-python test-swift

test-python: venv
	$(PY) -m pytest -q

vectors: venv
	$(PY) -m ios_bridge.vectors --out $(VECTORS)

test-swift: vectors
	MINICPM_VECTORS=$(CURDIR)/$(VECTORS) $(SWIFT) test --package-path $(SWIFT_PACKAGE)

# Property-based fuzzing of every input the toolkit reads (tests/fuzz): FUZZ_CASES per target (default 10 000).
FUZZ_CASES ?= 10000
fuzz: venv
	FUZZ_CASES=$(FUZZ_CASES) $(PY) -m tests.fuzz

# Speed and memory of the schedule (export time and peak RSS, bytes per token, TTFT, prefill/decode tok/s against
# the measured DRAM roofline, device estimate) on tiny and mid-size models, tiny MiniCPM-V 4.6 / 4.7 included.
# `make bench FULL=1` = `make bench-full`.
bench: venv
	$(PY) -m runtime.bench $(if $(FULL),--full-size --hybrid-full)

# The same plus the full-size models: V-4.0-shaped (3.79 B, random weights; ~7.1 GB built on first use, 20+ GB RAM)
# and 4.7-1B-shaped (1.30 B; ~2.6 GB built on first use, its float32 export peaks near 10.5 GB RAM).
bench-full: venv
	$(PY) -m runtime.bench --full-size --hybrid-full

# Only the 4.7-1B-shaped model (ONNX float and int4 through onnxruntime; about 50 minutes on 2 cores).
bench-hybrid-full: venv
	$(PY) -m runtime.bench --models "" --hybrid-full --out out/bench-hybrid-full

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache $(SWIFT_PACKAGE)/.build

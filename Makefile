# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing (CPU torch pinned: a looser pin pulls a multi-GB CUDA build).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: venv demo test bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	@rm -f $(VENV)/.installed-*
	@touch $@

DEMO_OUT := out/tiny-minicpm-v-4-onnx

# Export the embedded tiny model to ONNX (parity table), then answer through onnxruntime (timings).
demo: venv
	$(PY) -m export.onnx --model tiny-minicpm-v-4 --out $(DEMO_OUT)
	$(PY) -m runtime.generate --artifacts $(DEMO_OUT) --backend onnxruntime --image examples/house.png \
		--prompt "What is in this image?" --max-new-tokens 32

test: venv
	$(PY) -m pytest -q

# Speed and memory of the schedule (export, TTFT, prefill/decode tok/s, peak RSS) on tiny and mid-size models.
bench: venv
	$(PY) -m runtime.bench

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

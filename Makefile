# Two set-up commands: `make demo` and `make test`. Both create .venv if missing.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	# torch/torchvision pinned: these releases are on the build machines' disk
	$(VPY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(VPY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) tools/demo.py --output-dir runs/demo

test: $(STAMP)
	$(VPY) -m pytest -q -x --durations=15 tests

clean:
	rm -rf runs build *.egg-info

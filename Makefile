# The two commands of the README:
#   make demo   - the miniature end-to-end AccVideo run on the embedded default models (CPU, minutes)
#   make test   - creates .venv (torch 2.13.0 CPU + test deps) and runs the test suite, printing every skip reason
#                 and the 15 slowest tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench env clean-env

$(STAMP): requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-test.txt
	touch $(STAMP)

env: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -rs --durations=15 tests

demo: $(STAMP)
	$(PY) -m accvideo_core.demo

bench: $(STAMP)
	$(PY) -m bench

clean-env:
	rm -rf $(VENV)

# privedge: sudo make demo | sudo make test (both set the machine up first)
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup test test-unit test-bpf test-integration lint demo lab-up lab-down lab-status \
	bench-xdp bench-steer bench-l7 bench-waf bench-metadata bench-control clean

setup:
	bash scripts/setup.sh

lint: setup
	$(VENV)/bin/ruff check agent control core lab bench tests

test: setup lint
	$(PY) -m pytest tests/unit tests/bpf tests/integration

test-unit:
	$(PY) -m pytest tests/unit

test-bpf:
	$(PY) -m pytest tests/bpf

test-integration:
	$(PY) -m pytest tests/integration

demo: setup
	$(PY) -m lab.demo

lab-up: setup
	$(PY) -m lab up

lab-down:
	$(PY) -m lab down

lab-status:
	$(PY) -m lab status

bench-xdp: setup
	$(PY) -m bench.xdp

bench-steer: setup
	$(PY) -m bench.steer

bench-l7: setup
	$(PY) -m bench.l7

bench-waf: setup
	$(PY) -m bench.waf

bench-metadata: setup
	$(PY) -m bench.metadata

bench-control: setup
	$(PY) -m bench.control

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

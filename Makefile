# Two commands on a fresh machine: `make run` trains k2-tiny on several gloo ranks on CPU,
# `make test` runs the test suite. Both create (or reuse) the virtualenv in $(VENV).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.k2mcore-installed
NPROC ?= 4
RUN_ARGS ?= --set parallel.tp=2 --set parallel.sp=true --set parallel.ep=2 --set parallel.etp=1

.PHONY: install run test check clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[test,dali]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH launch/local.sh $(NPROC) --config k2-tiny $(RUN_ARGS)
	$(VENV)/bin/k2m-plot runs/k2-tiny

check: $(STAMP)
	$(VENV)/bin/k2m-train --config kimi-k2 --check --world-size 256

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) runs

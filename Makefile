# Two commands on a fresh machine: `make run` trains k2-tiny on several gloo ranks on CPU,
# `make test` runs the test suite. Both create (or reuse) the virtualenv in $(VENV).
VENV ?= .venv
# The interpreter for a new $(VENV): PYTHON=... if given, else tools/find_python.sh's Python 3.12
PYTHON ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.k2mcore-installed
NPROC ?= 4
RUN_ARGS ?= --set parallel.tp=2 --set parallel.sp=true --set parallel.ep=2 --set parallel.etp=1
IS_312 := -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'

.PHONY: install run sft long-context rl test check gpu-wheels clean

$(STAMP): setup.py constraints.txt
	@if [ -x $(PY) ] && ! $(PY) $(IS_312); then \
	    if [ "$(VENV)" = .venv ]; then echo "make: .venv is not Python 3.12: recreating it"; rm -rf .venv; \
	    else echo "make: $(VENV) is not a Python 3.12 virtualenv (k2mcore needs 3.12)" >&2; exit 1; fi; fi
	@if [ ! -x $(PY) ]; then \
	    py="$(PYTHON)"; if [ -z "$$py" ]; then py=$$(tools/find_python.sh) || exit 1; fi; \
	    echo "make: creating $(VENV) with $$py"; "$$py" -m venv $(VENV) || exit 1; fi
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[test,dali]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH launch/local.sh $(NPROC) --config k2-tiny $(RUN_ARGS)
	$(VENV)/bin/k2m-plot runs/k2-tiny

# released weights -> SFT -> Hugging Face on the bundled assets (docs/conversion.md, the recipe):
# a random DeepseekV3 release, hf-to-mcore, packed chat SFT with MuonClip at TP2 x EP2,
# mcore-to-hf, greedy generation in transformers reproducing the trained replies
sft: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) tools/sft_recipe.py --out runs/sft

# context extension as K2 did it (docs/context_parallel.md): k2-tiny at 128 tokens, then resumed
# at 512 with YaRN on CP2; validation losses at 512 before and after
long-context: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) tools/long_context_recipe.py --out runs/long-context

# RL on a verifiable task (docs/rl_loop.md, the recipe): a format-only SFT, then k2m-rl (GRPO,
# colocated transformers engines, weight sync) at DP2 x EP2 until the held-out reward is >= 0.7;
# the policy exported to HF and its held-out score reproduced in transformers
rl: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) tools/rl_recipe.py --out runs/rl

check: $(STAMP)
	$(VENV)/bin/k2m-train --config kimi-k2 --check --world-size 256

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=25 tests

# wheels for the GPU check's machine (Python 3.12, torch, no megatron-core, no network): kept in the
# git-ignored .whl/, carried with the tree, installed there by benchmarks/gpu_check.sh
gpu-wheels: $(STAMP)
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 \
	    --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.19.2

clean:
	rm -rf $(VENV) runs

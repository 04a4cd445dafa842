# Every target sets itself up: a fresh machine needs only python3 (>= 3.11) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# peerlearn.torch's tests and examples. This machine kind's pip finds the CPU build of 2.13.0 on
# disk; elsewhere PyPI's is a multi-GB CUDA build: make TORCH='torch==2.13.0 --index-url
# https://download.pytorch.org/whl/cpu'. Users take the range of the [torch] extra.
TORCH  ?= torch==2.13.0

.PHONY: demo test test-slow lint bench bench-metrics bench-round clean system-deps mutate secrets k8s-secrets

# Real servers the tests start (Debian packages): command:package. Installed when missing and
# possible (root with apt); otherwise the tests that need them skip and say why.
SYSTEM_TOOLS := prometheus:prometheus promtool:prometheus docker-compose:docker-compose nft:nftables \
                chromium:chromium

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "peerlearn needs Python >= 3.11 (found $$($(PYTHON) --version))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/peerlearn demo

# The secrets of docker-compose.yml (secrets/) and of configs/k8s (configs/k8s/secrets/):
# random, never overwritten, never committed (docs/deploy.md, "Secrets").
secrets:
	scripts/make-secrets.sh

k8s-secrets:
	scripts/make-secrets.sh --k8s

lint: $(STAMP)
	$(BIN)/ruff check peerlearn tests benchmarks examples
	$(BIN)/ruff format --check peerlearn tests benchmarks examples
	$(BIN)/mypy

system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair##*:}"; done; \
	missing=$$(echo $$missing | tr ' ' '\n' | sort -u | xargs); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian packages: $$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends $$missing >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $$missing >/dev/null; }; \
	else echo "note: $$missing missing (needs root and apt): tests using them are skipped"; fi

test: lint system-deps
	$(BIN)/pytest -q

test-slow: $(STAMP) system-deps
	$(BIN)/pytest -q -m slow -o addopts='--strict-markers -rfEs'

# Mutation testing of the core modules ([tool.mutmut] in pyproject.toml): by hand, never in CI
# (hours on 2 cores; resumable). Mutants land in mutants/; `$(BIN)/mutmut browse` to read them.
# MUTANTS narrows the run to names matching a glob, e.g. MUTANTS='peerlearn.wire*'.
MUTANTS ?=
mutate: $(STAMP)
	$(BIN)/mutmut run $(MUTANTS)
	$(BIN)/mutmut results

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_sim.py
	$(BIN)/python benchmarks/bench_sim_scale.py
	$(BIN)/python benchmarks/bench_codec.py
	$(BIN)/python benchmarks/bench_transport.py

# one averaging round against gloo, hivemind and a raw-socket exchange of the same bytes (about
# 6 min; needs an idle machine): benchmarks/bench_round.py, with the [bench] extra
bench-round: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/bench_round.py

# what the metrics cost (about 30 min; needs an idle machine): benchmarks/bench_metrics.py
bench-metrics: $(STAMP)
	$(BIN)/python benchmarks/bench_metrics.py

clean:
	rm -rf $(VENV) runs mutants .pytest_cache .mypy_cache .ruff_cache

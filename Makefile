# The two commands of the README:  `make demo`  and  `make test`.
# Both create ./.venv on first use and install everything into it, torch first
# (the pinned CPU build), then latent-lr with its test extras.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): setup.cfg pyproject.toml .ci/install
	bash .ci/install "$(PYTHON)" "$(VENV)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/latent-lr demo

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info

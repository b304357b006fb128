# The two front-door commands: `make reproduce` and `make test`. Both set up .venv themselves (idempotent:
# the install is redone only when pyproject.toml or constraints.txt changed).
PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PROFILE ?= default
NB      ?=
JOBS    ?= 1
TORCH   := torch==2.14.1 torchvision==0.29.1
# Jupyter refuses to start as root ("Running as root is not recommended") unless told: containers and rented GPU
# machines run as root.  LAB_ARGS passes further options (e.g. --no-browser --port 8890).
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)
LAB_ARGS ?=
# PYTEST_ARGS passes further pytest options to `make test` (e.g. PYTEST_ARGS='--durations=20 -k loss').
PYTEST_ARGS ?=

.PHONY: setup reproduce test lab clean-outputs constraints

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

## make reproduce [PROFILE=smoke|default|gpu|paper] [NB=00_quickstart,...] [JOBS=N] [FRESH=1]: run notebooks with
## papermill; goes on where a killed run stopped (skips notebooks already done by this commit with these params)
## unless FRESH=1
reproduce: $(STAMP)
	$(BIN)/python -m bilevel_ssl.reproduce --profile $(PROFILE) --nb '$(NB)' --jobs $(JOBS) $(if $(FRESH),,--resume)

## make test: unit tests + nbval regression of the notebooks (smoke settings)
test: $(STAMP)
	$(BIN)/python -m pytest tests notebooks --nbval-lax --nbval-current-env \
		--nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider $(PYTEST_ARGS)

## make lab: JupyterLab on the repo with the project's environment
lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=. $(ROOT_FLAG) $(LAB_ARGS)

## make constraints: record the exact versions of the current .venv (after a deliberate upgrade)
constraints:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e ' > constraints.txt

clean-outputs:
	find outputs -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +

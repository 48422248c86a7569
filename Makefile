# Two commands (README "Quick start"): `make demo` and `make test`; each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,plot]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/eobackbones list
	EOBACKBONES_OFFLINE=1 $(BIN)/eobackbones probe --model dofa_base --out probe_out

test: $(BIN)/.installed
	# passive OpenMP threads: spinning workers starve each other (and the test servers) on small shared machines
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) probe_out

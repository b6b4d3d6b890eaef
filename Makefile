# The two fresh-machine commands (README): `make demo` and `make test`.
# Both create/refresh the virtual environment at .venv/ first (tools/install.sh, idempotent).
PY := .venv/bin/python

.PHONY: install demo test test-fast wheelhouse

install:
	bash tools/install.sh

demo: install
	$(PY) tools/train_demo.py

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

wheelhouse: install
	$(PY) tools/build_wheelhouse.py --python-version 3.12 --preset gpu-node --out wheelhouse

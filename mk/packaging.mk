# Packaging (issue 21): every distribution built as users get it, then installed from its wheels.
#
# `test-wheels` builds the wheel and sdist of every workspace member (uv build: each wheel from its
# sdist), installs the core and the transformers plugin from those wheels, not editable, into a fresh
# environment, and the core wheel alone into another, then runs tests/packaging from the
# transformers environment: metadata and contents of every file, `twine check`, `skyrl-backends
# plugins` and a conformance group in the wheel environment from an empty folder, and what the core
# alone says when an extra is missing. The packages come from uv's cache, which the workspace sync
# filled, and torch from the local wheel: about a minute on the 2-core machine (docs/packaging.md).
EXTRA_TESTS += test-wheels

DIST := .cache/dist
WHEEL_ENV := $(VENV)/wheel-test
WHEEL_CORE_ENV := $(VENV)/wheel-core
TWINE := twine==7.0.0

.PHONY: test-wheels dists

dists: | $(UV)
	rm -rf $(DIST)
	$(UV) build -q --all-packages -o $(DIST)

test-wheels: dists $(TF_ENV)/.ready $(MODEL)/.skyrl_tiny_model
	$(UV) tool run -q --from $(TWINE) twine check --strict $(DIST)/*
	rm -rf $(WHEEL_ENV) $(WHEEL_CORE_ENV)
	$(UV) venv -q --python $(PYTHON) $(WHEEL_ENV)
	$(UV) pip install -q --python $(WHEEL_ENV)/bin/python --find-links $(TORCH_WHEELS) \
		'torch==2.13.0+cpu' "$$(ls $(DIST)/skyrl_backends-*.whl)[testing]" $(DIST)/skyrl_backend_transformers-*.whl
	$(UV) venv -q --python $(PYTHON) $(WHEEL_CORE_ENV)
	$(UV) pip install -q --python $(WHEEL_CORE_ENV)/bin/python $(DIST)/skyrl_backends-*.whl
	SKYRL_TEST_MODEL=$(abspath $(MODEL)) SKYRL_DIST=$(abspath $(DIST)) SKYRL_WHEEL_ENV=$(abspath $(WHEEL_ENV)) \
		SKYRL_WHEEL_CORE_ENV=$(abspath $(WHEEL_CORE_ENV)) \
		PYTHONPATH=plugins/vllm_backend/src:plugins/sglang_backend/src \
		$(TF_ENV)/bin/python -m pytest -q -p no:cacheprovider tests/packaging

# The two commands: `make run` (the default federated simulation) and `make test`.
# Both create .venv and install the project on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

# The Flower environment: deploy/flower_env.py is its one source (tests/test_flower_env.py holds
# this copy to it).
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL := 0.1
export FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE := 67108864
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO := 0

.PHONY: install run smoke test imports test-fast test-deploy lint format bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: install  ## the default run: 5+ training sources, 1 held out, DAM + DSM + SAM, DRO
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m simulations.run $(ARGS)

smoke: install
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m simulations.run experiment=smoke $(ARGS)

test: install imports  ## the import contract, then every test but the multi-host deployment ones (under 15 minutes on 2 cores)
	WANDB_MODE=disabled $(PY) -m pytest -q -m "not multihost" $(ARGS)

imports: install  ## the layers point down only (contracts in pyproject.toml [tool.importlinter])
	$(VENV)/bin/lint-imports

test-deploy: install  ## SuperLink + SuperNodes in network namespaces with TLS and node auth, and docker-compose.yml under podman-compose (root)
	WANDB_MODE=disabled $(PY) -m pytest -q -m multihost tests/test_deploy.py $(ARGS)

test-fast: install
	WANDB_MODE=disabled $(PY) -m pytest -q -m "not slow" $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# zcontrol: every target works on a fresh clone with Python 3.11 and the package registries.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test lint run run-agent demo bench bench-core bench-bus bench-db bench-agent bench-alloc \
	bench-vm clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

# The whole suite, including the tests against the real RabbitMQ and PostgreSQL.
test: $(STAMP)
	$(BIN)/trial --jobs=2 tests

lint: $(STAMP)
	$(BIN)/ruff check zcontrol agent tests bench twisted

# A management node in the foreground on the embedded defaults (LocalBus, SQLite under ./var).
# Its agents' bootstrap token is kept in var/agent-token (created on the first start).
run: $(STAMP)
	mkdir -p var
	$(BIN)/twistd --nodaemon --pidfile= zcontrol --data-dir var

# A simulated-hypervisor agent in the foreground, requiring the token of `make run`'s node
# (var/agent-token, created here if the node has not run yet: either may start first). It
# serves 4 slots, http://127.0.0.1:7070/hosts/0..3: hosts and a backup storage, one a slot.
run-agent: $(STAMP)
	$(BIN)/python -m agent.bootstrap var/agent-token
	$(BIN)/twistd --nodaemon --pidfile= zagent --hosts 4 --bootstrap-token-file var/agent-token

# The inventory through a real node and a real simulated agent, in one process, step by step.
demo: $(STAMP)
	$(BIN)/python -m zcontrol.demo

bench: bench-core bench-bus bench-db bench-agent bench-alloc bench-vm
	$(BIN)/python -m bench.summary

bench-core: $(STAMP)
	$(BIN)/python -m bench.bench_core

# oslo.messaging, the bus bench's point of comparison, lives in its own virtualenv.
OSLO_VENV := bench/.venv-oslo

$(OSLO_VENV)/.installed:
	test -x $(OSLO_VENV)/bin/python || $(PYTHON) -m venv $(OSLO_VENV)
	$(OSLO_VENV)/bin/pip install -q "oslo.messaging==18.3.1"
	touch $@

bench-bus: $(STAMP) $(OSLO_VENV)/.installed
	$(BIN)/python -m bench.bench_bus

bench-db: $(STAMP)
	$(BIN)/python -m bench.bench_db

bench-agent: $(STAMP)
	$(BIN)/python -m bench.bench_agent

# Host allocations/s (choose + reserve + release) at 1,000 and 10,000 hosts, SQLite and
# PostgreSQL (127.0.0.1:5432), 1 and 50 concurrent allocators.
bench-alloc: $(STAMP)
	$(BIN)/python -m bench.bench_alloc

# VM creates/s through the bus and the node's CPU per VM (split bus/store/agent HTTP/rest from
# a profile) on 1,000 simulated hosts in an agent process: embedded, then PostgreSQL + RabbitMQ.
# BENCH_VM_ARGS passes options (python -m bench.bench_vm --help), e.g. BENCH_VM_ARGS="--vms 200".
bench-vm: $(STAMP)
	$(BIN)/python -m bench.bench_vm $(BENCH_VM_ARGS)

clean:
	rm -rf $(VENV) _trial_temp* var build *.egg-info

# runner-provisioner. The two commands a newcomer needs:
#   make demo   run the operator against the local environment (control plane + simulators)
#   make test   everything CI runs
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
export GOTOOLCHAIN := $(shell sed -n 's/^GO_TOOLCHAIN=//p' tests/tools/versions.env)

.PHONY: all build tools deps lint test unit-test integration-test demo env-up env-down crds bench clean-dev

all: build

build:
	$(CARGO) build --workspace --all-targets

## The real control plane (kube-apiserver, kube-controller-manager, etcd) and helm,
## built from Go modules into ~/.cache/runner-provisioner/tools/<versions>/ once.
tools:
	tests/tools/build.sh

## System packages the tests need (Debian) and the cached Debian rootfs of the
## VM bootstrap test. Installs only what is missing.
DEB_PACKAGES := shellcheck debootstrap e2fsprogs python3-yaml
deps:
	scripts/install-deps.sh $(DEB_PACKAGES)
	scripts/bootstrap-test/build-rootfs.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: tools deps lint
	$(CARGO) test --workspace --no-fail-fast

## Benchmarks: policy quality on the real trace (target/bench/policy.json) and
## controller cost with 100 and 1,000 RunnerPools (target/bench/controller-*.json).
bench: tools
	$(CARGO) bench --bench policy
	$(MAKE) bench-controller

## Regenerate the checked-in RunnerPool CRD from the Rust types.
crds:
	$(CARGO) run --quiet -- crd > crds/runnerpool.yaml

## Start the control plane and both simulators in the background; writes
## .dev/kubeconfig and .dev/env (source it).
env-up: tools
	$(CARGO) build --quiet -p rp-testenv --bin rp-env
	tests/support/env-up.sh

## Stop everything env-up started.
env-down:
	tests/support/env-down.sh

## The one-command demo (see "The demo" in README.md): builds the operator and
## rp-demo, then runs the operator against the control plane and both
## simulators with demo/runnerpool.yaml, replaying 12 simulated hours of a real
## CI trace at 240x (about 4 minutes), and prints a summary. Options go in
## DEMO_ARGS, e.g. DEMO_ARGS=--short (2 simulated hours, about 1 minute) or
## DEMO_ARGS='--time-scale 120 --hours 6'; `target/debug/rp-demo --help` lists them.
DEMO_ARGS ?=
demo: tools
	$(CARGO) build --bin runner-provisioner -p runner-provisioner
	$(CARGO) build -p rp-testenv --bin rp-demo
	$${CARGO_TARGET_DIR:-target}/debug/rp-demo $(DEMO_ARGS)

## The demo's CI mode (what tests/support/tests/demo.rs runs).
.PHONY: demo-short
demo-short:
	$(MAKE) demo DEMO_ARGS='--short $(DEMO_ARGS)'

## Helm chart (charts/runner-provisioner).
.PHONY: chart-crds chart-lint chart-test
HELM ?= $(shell tests/tools/build.sh --print)/helm
CHART := charts/runner-provisioner

## Copy the RunnerPool CRD into the chart and regenerate the pool part of its
## values.schema.json from it (after `make crds`).
chart-crds:
	cp crds/runnerpool.yaml $(CHART)/crds/runnerpool.yaml
	RP_UPDATE_CHART=1 $(CARGO) test --quiet --test chart -- --exact values_schema_is_generated_from_the_crd

## helm lint --strict with the chart's defaults and every ci/*.yaml.
chart-lint: tools
	$(HELM) lint --strict $(CHART)
	for f in $(CHART)/ci/*.yaml; do $(HELM) lint --strict $(CHART) -f "$$f"; done

## The chart tests: lint, template assertions, server-side dry-run of every
## render and example, the operator with the chart's RBAC.
chart-test: tools
	$(CARGO) test --test chart

## Operator cost and scale (design.md §5): 100 then 1,000 RunnerPools against the
## real control plane and the simulators, with the release operator. Prints a
## table per run and writes target/bench/controller-<N>.json (and the
## operator's log next to it). BENCH_CONTROLLER_POOLS / _ARGS override.
.PHONY: bench-controller
BENCH_CONTROLLER_TARGET := $(or $(CARGO_TARGET_DIR),target)
BENCH_CONTROLLER_POOLS ?= 100 1000
BENCH_CONTROLLER_ARGS ?=
bench-controller: tools
	$(CARGO) build --release -p runner-provisioner --bin runner-provisioner
	$(CARGO) build --release -p rp-testenv --bin rp-bench-controller
	mkdir -p target/bench
	for n in $(BENCH_CONTROLLER_POOLS); do \
	  $(BENCH_CONTROLLER_TARGET)/release/rp-bench-controller --pools $$n \
	    --operator-bin $(BENCH_CONTROLLER_TARGET)/release/runner-provisioner \
	    --output target/bench/controller-$$n.json $(BENCH_CONTROLLER_ARGS); \
	done

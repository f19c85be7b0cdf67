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

demo: tools
	@echo "make demo: the one-command demo (operator + example RunnerPool + a replayed CI trace)"
	@echo "is built by the demo issue; until then use 'make env-up' to start the local environment."

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

# Developer entry points. Commands run from .venv/bin; nothing needs activating.
# A fresh Debian/Ubuntu machine needs python3, make and apt-get (as root or with
# sudo): `make demo` and `make test` install the rest, the C compiler and the
# Python headers that pyfuse3 builds with included.
#
# Under `pipefail` no pipeline here may end in a reader that stops early (`head`,
# `grep -q`): the writer then dies of SIGPIPE and make fails with no message.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# pyfuse3 has no wheel: pip compiles it, against libfuse3 and Python.h.
FUSE_DEBS := fuse3 libfuse3-dev pkg-config python3-dev python3-venv gcc libc6-dev
FUSE_CHECK := pkg-config --exists fuse3 2>/dev/null && command -v fusermount3 >/dev/null \
	&& command -v cc >/dev/null && $(PYTHON) -c 'import ensurepip' 2>/dev/null \
	&& $(PYTHON) -c 'import sysconfig as s, os.path as p, sys; \
		sys.exit(not p.exists(p.join(s.get_path("include"), "Python.h")))'
# python3-llfuse: `borg mount` needs it, and borgbackup only recommends it.
BENCH_DEBS := borgbackup python3-llfuse restic fuse-overlayfs

# $(call apt_ensure,PACKAGES,CHECK): unless the shell command CHECK succeeds,
# install whichever PACKAGES `dpkg -s` does not report installed, as root or
# through sudo, running `apt-get update` only when something is missing.
define apt_ensure
if $(2); then exit 0; fi; \
missing=""; \
for p in $(1); do \
	dpkg -s "$$p" 2>/dev/null | grep '^Status: install ok installed' >/dev/null || missing="$$missing $$p"; \
done; \
[ -n "$$missing" ] || exit 0; \
if ! command -v apt-get >/dev/null; then \
	echo "make: missing$$missing, and no apt-get here to install them" >&2; exit 1; \
fi; \
if [ "$$(id -u)" = 0 ]; then sudo=""; \
elif command -v sudo >/dev/null; then sudo="sudo"; \
else echo "make: missing$$missing; install them as root (no sudo here)" >&2; exit 1; fi; \
echo "make: installing$$missing"; \
$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq; \
$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing
endef

.PHONY: help deps bench-deps venv lint test test-fast demo bench clean

help:
	@echo "make test    lint (ruff, mypy) and run the tests; installs what is missing"
	@echo "make test-fast  the tests that mount nothing (pytest -m 'not mount'), under a minute"
	@echo "make demo    generate a sample tree in demo/, plan, migrate it, show stats"
	@echo "make bench   run the benchmark (installs borgbackup, restic, fuse-overlayfs)"
	@echo "make lint    ruff check and mypy only"
	@echo "make deps    Debian packages for FUSE; make venv: .venv with ferryfs editable"
	@echo "make clean   remove demo/, bench-out/ and caches (not .venv); the next demo starts fresh"

deps:
	@$(call apt_ensure,$(FUSE_DEBS),$(FUSE_CHECK))

bench-deps:
	@$(call apt_ensure,$(BENCH_DEBS),command -v borg && /usr/bin/python3 -c "import llfuse" 2>/dev/null && command -v restic && command -v fuse-overlayfs)

# pyfuse3 builds against libfuse3, hence deps first.
venv: deps
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if [ ! -e $(STAMP) ] || [ pyproject.toml -nt $(STAMP) ] \
		|| ! $(BIN)/python -c 'import ferryfs.tools.cli' 2>/dev/null; then \
		$(BIN)/python -m pip install -q -e '.[test]'; \
		touch $(STAMP); \
	fi

# mypy cannot follow setuptools' editable import hook: run as `mypy store fs tools`,
# every `ferryfs.*` import is Any and the strict override for ferryfs.store.* never
# applies. So give it the installed layout as symlinks, and print repo paths.
# tools/bench is not part of the package (pyproject lists the packages): its
# modules import each other by plain name, so it is checked on its own.
MYPY_PATH := $(VENV)/mypy-path

lint: venv
	$(BIN)/ruff check .
	@mkdir -p $(MYPY_PATH)/ferryfs
	@for d in store fs tools; do ln -sfn ../../../$$d $(MYPY_PATH)/ferryfs/$$d; done
	MYPYPATH=$(MYPY_PATH) $(BIN)/mypy --exclude '/tools/bench/' \
		-p ferryfs.store -p ferryfs.fs -p ferryfs.tools | sed 's|^$(MYPY_PATH)/ferryfs/||'
	MYPYPATH=$(MYPY_PATH):tools/bench $(BIN)/mypy --explicit-package-bases tools/bench

test: lint
	$(BIN)/pytest -q

test-fast: venv
	$(BIN)/pytest -q -m "not mount"

demo: venv
	BIN=$(BIN) tools/demo.sh

# The benchmark is not installed with ferryfs (tools/bench/ is outside the package).
bench: venv bench-deps
	$(BIN)/python tools/bench/run.py $(BENCH_ARGS)

# --one-file-system: never delete through a mount someone left under demo/.
clean:
	rm -rf --one-file-system demo bench-out build .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

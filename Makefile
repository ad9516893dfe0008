PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed

.PHONY: demo test install bench photos clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml requirements-dev.txt requirements-nodeps.txt
	$(PIP) install -r requirements-dev.txt
	$(PIP) install -e '.[zoo,test,export,text]'
	$(PIP) install --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sub8 demo

# The layers (.importlinter): a lower layer never imports a higher one. Then the tests; pytest
# exits 5 when it collects no test: that is a failure too.
test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: no test ran" >&2; exit 1; fi; exit $$status

# The benchmark photo set (GNOME/MATE wallpapers, Tux Paint stamps, scikit-image photos).
photos: $(STAMP)
	@test -d /usr/share/tuxpaint/stamps/animals -a -d /usr/share/backgrounds/mate || \
		(apt-get update -qq && apt-get install -y -qq gnome-backgrounds mate-backgrounds tuxpaint-stamps-default)
	$(PY) benchmarks/build_photo_set.py --out data/bench-photos

bench: photos
	$(PY) benchmarks/bench_rtn.py --photos data/bench-photos

clean:
	rm -rf $(VENV) build src/*.egg-info

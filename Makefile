# The README's two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out/shapes-llava
QUESTION ?= Which is further left, the yellow triangle or the red circle? Answer with one word.

.PHONY: install demo test clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/export-engine --model shapes-llava --keep 0.33 --out $(OUT) --force
	@echo "Q: $(QUESTION)"
	@printf "A:" && $(BIN)/leanvlm generate $(OUT) --image leanvlm/assets/shapes-example.png --prompt "$(QUESTION)" --max-new-tokens 4

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache

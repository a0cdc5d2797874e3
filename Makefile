# The commands the README gives. `make run` and `make test` work on a fresh checkout: both fetch
# the embedding model first when it is missing.

MODEL_DIR := models/all-MiniLM-L6-v2
ARGS ?=

.PHONY: run test lint bench model clean-model browser-deps

run: model
	cargo run --release -- serve $(ARGS)

test: model browser-deps
	cargo test --all-targets

# Debian's Chromium and playwright-core, for the dashboard's browser test.
browser-deps:
	tests/browser/setup

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

# Every bench. `load` starts the release binary against an in-process model and asks the prompts
# in ../shared/data/sharegpt_first_prompts.jsonl (built-in ones when that file is missing); run
# one bench alone with `cargo bench --bench load -- --help`.
bench: model
	cargo bench

model: $(MODEL_DIR)/model.safetensors

$(MODEL_DIR)/model.safetensors:
	./models/fetch

clean-model:
	rm -rf $(MODEL_DIR)

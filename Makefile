# The commands the README gives. `make run` and `make test` work on a fresh checkout: both fetch
# the embedding model, its ONNX graphs and ONNX Runtime first (models/fetch does nothing when
# they are all there).

MODEL_DIR := models/all-MiniLM-L6-v2
ARGS ?=

.PHONY: run test lint bench model clean-model browser-deps redis-deps sdk-deps

run: model
	cargo run --release -- serve $(ARGS)

test: model browser-deps redis-deps sdk-deps
	cargo test --all-targets

# Debian's Chromium and playwright-core, for the dashboard's browser test.
browser-deps:
	tests/browser/setup

# The official OpenAI client for JavaScript, for the SDK conformance tests.
sdk-deps:
	tests/sdk/setup

# Debian's redis-server, for the multi-node tests (they start their own servers).
redis-deps:
	tests/redis/setup

# Every target with both embedding backends, then with each alone.
lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --no-default-features --features candle -- -D warnings
	cargo clippy --all-targets --no-default-features --features onnx -- -D warnings

# Every bench. `load` starts the release binary against an in-process model and asks the prompts
# in ../shared/data/sharegpt_first_prompts.jsonl (built-in ones when that file is missing); run
# one bench alone with `cargo bench --bench load -- --help`.
bench: model redis-deps
	cargo bench

model:
	./models/fetch

clean-model:
	rm -rf $(MODEL_DIR) models/onnxruntime

# One command each (see README): `make serve` sets up and serves; `make test` sets up and runs the tests.
.PHONY: setup setup-test serve test lint bench

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --test

serve: setup
	.venv/bin/drllm serve

test: setup-test
	.venv/bin/ruff check routing server tests bench
	.venv/bin/python -m pytest

lint:
	.venv/bin/ruff check routing server tests bench

bench: setup
	.venv/bin/drllm bench

"""`python jobs/evaluate.py [config.yaml ...] [key=value ...]`: `capray evaluate` from this checkout (docs/cli.md)."""

from _entry import run

run("evaluate")

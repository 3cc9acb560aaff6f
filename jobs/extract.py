"""`python jobs/extract.py [config.yaml ...] [key=value ...]`: `capray extract` from this checkout (docs/cli.md)."""

from _entry import run

run("extract")

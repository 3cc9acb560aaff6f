"""`python jobs/demo.py [config.yaml ...] [key=value ...]`: `capray demo` from this checkout (docs/cli.md)."""

from _entry import run

run("demo")

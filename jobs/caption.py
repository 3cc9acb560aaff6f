"""`python jobs/caption.py [config.yaml ...] [key=value ...]`: `capray caption` from this checkout (docs/cli.md)."""

from _entry import run

run("caption")

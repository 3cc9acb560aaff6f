"""`python jobs/audit.py [config.yaml ...] [key=value ...]`: `capray audit` from this checkout (docs/cli.md)."""

from _entry import run

run("audit")

"""`python jobs/export.py [config.yaml ...] output=DIR [key=value ...]`: `capray export` from this checkout (docs/deploy.md)."""

from _entry import run

run("export")

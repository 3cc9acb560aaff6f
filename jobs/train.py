"""`python jobs/train.py [config.yaml ...] [key=value ...]`: `capray train` from this checkout (docs/cli.md)."""

from _entry import run

run("train")

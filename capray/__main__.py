"""`python -m capray <job> [config.yaml ...] [key=value ...]`: the one entry (docs/cli.md)."""

import sys

from capray.cli import main

sys.exit(main())

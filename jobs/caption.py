"""Entry point for the caption job: `python jobs/caption.py [config.yaml] [key=value ...]`.

Works locally and under `ray job submit --working-dir . -- python jobs/caption.py ...`.
"""

import sys

from capray.cli import main

if __name__ == "__main__":
    sys.exit(main(job="caption"))

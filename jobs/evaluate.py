"""Entry point for the evaluate job: `python jobs/evaluate.py [config.yaml] [key=value ...]`.

Works locally and under `ray job submit --working-dir . -- python jobs/evaluate.py ...`.
"""

import sys

from capray.cli import main

if __name__ == "__main__":
    sys.exit(main(job="evaluate"))

"""Entry point for the train job: `python jobs/train.py [config.yaml] [key=value ...]`.

Works locally and under `ray job submit --working-dir . -- python jobs/train.py ...`.
"""

import sys

from capray.cli import main

if __name__ == "__main__":
    sys.exit(main(job="train"))

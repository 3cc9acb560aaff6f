"""Entry point for the extract job: `python jobs/extract.py [config.yaml] [key=value ...]`.

Works locally and under `ray job submit --working-dir . -- python jobs/extract.py ...`.
"""

import sys

from capray.cli import main

if __name__ == "__main__":
    sys.exit(main(job="extract"))

"""Entry point for the demo job: `python jobs/demo.py [config.yaml] [key=value ...]`.

Works locally and under `ray job submit --working-dir . -- python jobs/demo.py ...`.
"""

import sys

from capray.cli import main

if __name__ == "__main__":
    sys.exit(main(job="demo"))

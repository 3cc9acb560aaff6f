"""Entry point for the train job: `python jobs/train.py [config.yaml] [key=value ...]`.

Works locally and under `ray job submit --working-dir . -- python jobs/train.py ...`.
"""

import os
import sys

# The checkout this file belongs to (locally, or the working dir Ray uploaded) comes first on the
# path, so the code that runs is the code next to it, whether or not a capray is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from capray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(job="train"))

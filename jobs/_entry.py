"""What every `jobs/<job>.py` script does: run `capray <job>` from the checkout it belongs to.

The checkout (locally, or the working dir `ray job submit --working-dir .` uploaded) comes first
on the path, so the code that runs is the code next to the script, whether or not a capray is
installed. `python -m capray <job>` is the same command for an installed capray (docs/cli.md).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(job: str) -> None:
    """Exit with the status of `capray <job>` on this process's arguments."""
    from capray.cli import main

    sys.exit(main(job=job))

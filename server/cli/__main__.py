"""``python -m server.cli``: the same as the ``aligngate`` console script."""

import sys

from server.cli.main import main

# vLLM's engine spawns processes: nothing may run on import.
if __name__ == "__main__":
    sys.exit(main())

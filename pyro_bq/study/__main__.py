"""``python -m pyro_bq.study``: run the Dirty-MNIST study (same flags as ``pyro-bq study``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

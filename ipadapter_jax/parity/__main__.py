"""``python -m ipadapter_jax.parity``: the command lives in ipadapter_jax/cli/parity.py."""

import sys

from ipadapter_jax.cli.parity import main

if __name__ == "__main__":
    sys.exit(main())

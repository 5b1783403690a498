"""``python -m ipadapter_jax.convert``: the command lives in ipadapter_jax/cli/convert.py."""

import sys

from ipadapter_jax.cli.convert import PROG, main  # noqa: F401  (PROG: for older imports)

if __name__ == "__main__":
    sys.exit(main())

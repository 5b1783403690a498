"""``python -m ipadapter_jax.eval``: the command lives in ipadapter_jax/cli/eval.py."""

import sys

from ipadapter_jax.cli.eval import main, parse_args  # noqa: F401  (parse_args: for older imports)

if __name__ == "__main__":
    sys.exit(main())

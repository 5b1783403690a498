"""Generate images from a text prompt and reference images with IP-Adapter (JAX).

The command lives in the package (``ipadapter_jax/cli/sample.py``, installed as
``ipadapter-sample``); ``python sample.py --help`` lists every flag.
"""

import sys

from ipadapter_jax.cli.sample import generate, main, parse_args  # noqa: F401  (tests and scripts use these)

if __name__ == "__main__":
    sys.exit(main())

"""Train an IP-Adapter: ``python train.py --config CONFIG.py [--config.FIELD=VALUE ...]``.

The command lives in ipadapter_jax/cli/train.py (``--help`` lists its flags);
installed, it is also the ``ipadapter-train`` console script.
"""

import sys

from ipadapter_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())

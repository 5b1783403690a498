"""Sampling entry point (text + image prompt -> images).

Not implemented yet: it arrives with the sampling milestone. This stub exits
with an explanation instead of pretending to work.
"""

import sys

if __name__ == "__main__":
    sys.exit("sample.py: sampling is not implemented yet (see README 'Status'); "
             "the models load with ipadapter_jax.models.*.from_pretrained.")

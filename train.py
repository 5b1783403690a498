"""Training entry point (IP-Adapter training).

Not implemented yet: it arrives with the training milestone. This stub exits
with an explanation instead of pretending to work.
"""

import sys

if __name__ == "__main__":
    sys.exit("train.py: training is not implemented yet (see README 'Status').")

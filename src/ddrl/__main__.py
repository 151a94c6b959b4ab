"""``python -m ddrl …`` (and ``torchrun -m ddrl …``): the ``ddrl`` command."""

import sys

from ddrl.cli import main

sys.exit(main())

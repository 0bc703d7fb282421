"""``python -m mistnet``: the ``mistnet`` command (what torchrun runs: ``torchrun ... -m mistnet cloud ...``)."""

import sys

from mistnet.cli import main

sys.exit(main())

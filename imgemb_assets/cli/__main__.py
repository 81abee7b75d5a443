"""`python -m imgemb_assets.cli`: the `imgemb` command."""

import sys

from imgemb_assets.cli.main import main

sys.exit(main())

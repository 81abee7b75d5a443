"""`python -m imgemb_assets.core.lake migrate <lake uri>`: the command the README gives, kept at its path."""

import sys

from imgemb_assets.core.lake.lake import main

sys.exit(main())

"""The `imgemb` command for operators: `discover`, `status`, `backfill-missing` (main.py) and `similar` (similar.py).

`python -m imgemb_assets.cli` and the `imgemb` script run `main.main`. Kept free of imports: a command
imports only what it uses.
"""

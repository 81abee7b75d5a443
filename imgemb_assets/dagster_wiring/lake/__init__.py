"""The lake wiring: maintenance of every table, as a job and a schedule. Imports `names`, `location` and the core."""

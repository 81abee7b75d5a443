"""The defaults of lake maintenance, in a module free of deltalake.

`core.maintenance.MaintenanceSettings` and the location's settings (`dagster_wiring/location/settings.py`, which the CLI
imports without deltalake) both take their defaults from here, so that they are written once.
"""

from typing import Final

# Delta's own default of `delta.deletedFileRetentionDuration`.
DELTA_DEFAULT_RETENTION_HOURS: Final = 168
# Partitions with fewer small files are left as they are: rewriting them would gain little.
COMPACT_MIN_FILES: Final = 4
# The size of the files Lake writes (core.lake takes it from here); compaction aims at the same.
TARGET_FILE_BYTES: Final = 256 << 20

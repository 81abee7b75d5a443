"""What every domain's wiring uses: settings, partitions, one step over many partitions, retries,
automation conditions and the automation sensor, the executor and GPU placement, the shared resources,
and what the instance recorded. Imports only `names` and the core."""

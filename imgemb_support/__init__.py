"""Support shared by the tests and the benchmarks, not shipped with the code location.

Real services on 127.0.0.1 (moto's S3 server, PostgreSQL, Redis: `moto_server`,
`postgres_server`, `redis_server`, from Debian's packages via `debian_packages`),
a proxy that injects S3 faults (`fault_proxy`), a corpus of broken and hostile
inputs (`bad_inputs`), the code location run as a user runs it (`location`), the
Dagster webserver waited for (`dagster_webserver`), and the smallest rows a table
test writes (`rows`). The tests' fixtures stay in
`imgemb_assets_tests/conftest.py`.
"""

"""Data-quality checks as plain functions and their outcome (checks).

Imports no other domain. Keep this file free of imports: importing a light domain must not pull in torch or pyarrow.
"""

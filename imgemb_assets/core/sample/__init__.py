"""The demo's generated dataset (dataset).

May import every other domain. Keep this file free of imports: importing a light domain must not pull in torch or pyarrow.
"""

"""The sales export: validation and the join with the thumbnails (join).

May import storage, imaging, quality and lake. Keep this file free of imports: importing a light domain must not pull in torch or pyarrow.
"""

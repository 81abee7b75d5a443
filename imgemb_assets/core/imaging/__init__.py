"""Pictures as files: decode, orient, downscale and the rejection reasons (images), small contact sheets as markdown (contact_sheet), generated photos (synthetic).

Imports no other domain. Keep this file free of imports: importing a light domain must not pull in torch or pyarrow.
"""

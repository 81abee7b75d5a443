"""The sales wiring: sales_export, sales and images_with_sales; the sales sensor and jobs.
Imports `names`, `location` and the core."""

"""Every restoration method on every single and mixed test set; metrics, tables, charts, samples."""

"""Clean image sources, degradations described as data, and datasets built from manifests."""

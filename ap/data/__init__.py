"""Data loaders and sample preparation."""

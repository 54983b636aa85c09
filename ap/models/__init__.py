"""Models whose attention goes through ``ap.core.AttentionSite``."""

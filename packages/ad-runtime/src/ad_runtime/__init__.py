"""ad_runtime package."""

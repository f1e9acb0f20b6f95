"""ad_config package."""

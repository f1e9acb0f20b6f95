"""ad_cli package."""

"""ad_compiler package."""

"""Small helpers shared by transforms."""

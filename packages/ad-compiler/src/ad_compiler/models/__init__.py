"""Model factories: build a Hugging Face model on the meta device and load its weights."""

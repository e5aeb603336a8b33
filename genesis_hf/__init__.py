"""Genesis: the Genesis 1B model for Hugging Face transformers."""

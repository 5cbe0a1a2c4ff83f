"""skyrl-backend-transformers: the reference backend of skyrl_backends, on Hugging Face transformers."""

__version__ = "0.1.0"

"""SGLang backend for skyrl_backends (entry point ``sglang``). Importing it does not import SGLang."""

__version__ = "0.1.0"

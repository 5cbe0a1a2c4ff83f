"""The vLLM backend for skyrl_backends (entry point ``vllm``). Importing it imports neither vLLM nor torch."""

__version__ = "0.1.0"

import sys

from skyrl_rl_demo.cli import main

# Guarded: engines such as vLLM start worker processes that import the main module again.
if __name__ == "__main__":
    sys.exit(main())

import sys

from skyrl_rl_demo.cli import main

sys.exit(main())

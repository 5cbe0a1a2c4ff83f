import sys
from pathlib import Path

# The test modules share their tables (test_sources.DISTRIBUTIONS) by importing one another.
sys.path.insert(0, str(Path(__file__).parent))

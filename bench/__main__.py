"""``python -m pydistill.bench``: the whole benchmark suite (bench/suite.py; ``--help``)."""
import sys

from pydistill.bench.suite import main

if __name__ == "__main__":
    sys.exit(main())

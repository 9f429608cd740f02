"""`python -m medserve.perf`: the load-testing harness (see `medserve.perf.cli`)."""
import sys

from .cli import main

sys.exit(main())

"""`python -m tierstore` runs the CLI."""
import sys

from .inference.cli import main

sys.exit(main())

"""`python -m tierstore` runs the CLI."""
import sys

from .inference.front.cli import main

sys.exit(main())

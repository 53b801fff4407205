"""`python -m bot` runs the CLI."""

import sys

from bot.cli.main import main

sys.exit(main())

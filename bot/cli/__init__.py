"""Layer 4, the command line: `deksdenflow` and its subcommands (bot.cli.main:main)."""

"""Layer 0, the foundation: settings, errors, logging, file permissions. Imports nothing of bot."""

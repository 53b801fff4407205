"""DeksdenFlow: webhook-first GitHub App and GitLab bot running Codex protocols."""

__version__ = "0.1.0"

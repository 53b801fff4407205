"""Forges: GitHub, GitLab and Local behind one interface."""

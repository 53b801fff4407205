"""Webhook handlers: one module per concern, combined into one router by bot/handlers/routes.py."""

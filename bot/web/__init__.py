"""Layer 4, the web entry point: the app, the webhook edge, the CI hook, the operator API, the
console, the GitHub App setup flow and `serve`."""

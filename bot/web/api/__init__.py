"""The operator REST API under /api.

`core` is the common ground (auth, `guarded`, parameters, JSON shapes) that the console shares;
`table` holds the one list of operations that makes both the routes and the OpenAPI document.
Import from the submodules: this package module is empty, so importing `core` never pulls in the
endpoints (and with them the jobs).
"""

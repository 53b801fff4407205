"""Names `vulture bot engines vulture_whitelist.py --min-confidence 80` may not call dead.

Each entry is a bare reference to the name, with a comment saying who uses it and why vulture
cannot see that use (a framework calling it by name, a protocol method, a public API for
operators). At 80 % confidence vulture reports only certain findings (unused imports and
arguments, unreachable code), and the tree has none: the list is empty, and a new entry needs
its reason on the same line.
"""

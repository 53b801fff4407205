"""`deksdenflow protocol …`: run protocols on a plain local repository through the Local forge."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    del sub

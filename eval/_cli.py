"""The command line of the Python scripts in eval/: argparse, with a bad command line refused
in one line that names the usage (exit 2), as train/lib.sh does for the shell scripts,
instead of argparse's usage block followed by the error."""

from __future__ import annotations

import argparse
from pathlib import Path


class Parser(argparse.ArgumentParser):
    def __init__(self, script: str, **kwargs):
        super().__init__(prog=f"eval/{Path(script).name}", **kwargs)

    def error(self, message: str):
        usage = " ".join(self.format_usage().split()[1:])  # after "usage:", on one line
        self.exit(2, f"{self.prog}: error: {message}; usage: {usage} (--help for more)\n")

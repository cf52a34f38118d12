"""The one base for mistakes the user can fix: command-line programs print them as one `error:` line and exit 2;
anything else is a bug in lavis_lite and keeps its traceback."""

from __future__ import annotations

import argparse
from typing import NoReturn


class UserError(ValueError):
    """A problem with the user's input (config, file, image, index, checkpoint), phrased so that they can fix it.

    A ValueError, so that library callers may catch bad values the usual way."""


class CommandParser(argparse.ArgumentParser):
    """argparse for lavis_lite's programs: a usage mistake is one `error:` line naming the fix, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named (in a config key or an argument) does not exist."""

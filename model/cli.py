"""What train.py and sample.py share about talking to a user on the command line:
a bad flag or a bad input is one line on stderr and exit code 2, never a traceback
(unless --debug)."""
from __future__ import annotations

import argparse
import sys


class UserError(Exception):
    """Bad input from the user: reported as one line on stderr, exit code 2."""


# What a user can cause: our own errors, and the ValueErrors (DataError, CheckpointError,
# TokenizerUnavailableError ...), RuntimeErrors and OSErrors (unwritable dir, full disk)
# that the library raises with a message meant for them. Anything else is a bug: traceback.
USER_ERRORS = (UserError, ValueError, RuntimeError, OSError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with "(default: X)" after a flag's help, but only where X says something: not
    for flags whose default is None (their help says where the value comes from) or for
    on/off switches."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (not usage + message) and exit code 2."""

    def error(self, message: str) -> None:
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def report(error: Exception, debug: bool) -> int:
    """Print a user's error as one line and return exit code 2; re-raise anything else
    (a bug), or everything under --debug, with its traceback."""
    if debug or not isinstance(error, USER_ERRORS):
        raise error
    print("error: " + " ".join(str(error).split()), file=sys.stderr)  # one line, always
    return 2

"""The one error type for bad input.

Library code (model/, data/) raises UserError for anything the user can fix: a missing file,
a corrupt checkpoint, an option out of range. The scripts' main_guard (model/cli.py) turns it
into one line `error: ...` on stderr and exit code 2. It lives apart from the command-line
module so that library code never has to import the CLI to raise it.
"""


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""

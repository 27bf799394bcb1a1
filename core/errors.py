"""The one exception type that reaches users.

Raise `UserError` with a complete, one-paragraph sentence that names the file
or setting at fault and what to do about it. CLIs print it without a
traceback and exit with status 2; the GUI shows it as is.
"""


class UserError(Exception):
    """A failure the user can fix; its message is shown verbatim."""

"""User-facing errors: the CLI prints these as one line (a traceback only under --debug)."""


class UserError(Exception):
    """Bad input or a bad state the user can fix; the message says what and how."""

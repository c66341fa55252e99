"""One exception type for mistakes a user can fix; the CLI prints it as one line."""


class UserError(Exception):
    """Bad input (path, name, config key, checkpoint): reported without a traceback."""

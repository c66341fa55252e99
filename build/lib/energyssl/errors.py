"""Exceptions the CLI reports without a traceback."""


class UserError(Exception):
    """Bad input (path, name, config key, checkpoint): reported as one line, exit status 2."""


class Interrupted(Exception):
    """A stop asked for by SIGINT or SIGTERM, after the work was saved: exit status 130."""

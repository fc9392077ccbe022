"""The one exception type for bad user input outside the recipe (paths, teachers, data)."""


class UserError(Exception):
    """A problem the user can fix; the CLI prints str(e) as one line and exits with status 2."""

class UserError(Exception):
    """Bad input (file, flag, model) that the CLI reports as one line, without a traceback."""

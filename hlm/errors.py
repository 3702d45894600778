"""The one base of errors a user can fix (a setting, the prompt, the model pair, a flag): every front end shows
their message and no traceback (the CLI exits 2, the page shows a titled notice). Anything else is a bug."""


class UserError(ValueError):
    """Bad input or an unusable choice; the message says what to change."""

"""The one exception peftlite raises for bad input."""


class PeftliteError(ValueError):
    """A call was given something peftlite cannot use.

    The message says what was given, what was expected and how to fix it. Any call that raises
    it leaves the model exactly as it was before the call.
    """

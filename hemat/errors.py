"""The one error type the CLI turns into a clean message: every hemat error names the file, field or
value at fault."""


class HematError(ValueError):
    pass

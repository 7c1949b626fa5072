"""The one error type qcompiler raises for problems a user can fix."""


class QCompilerError(Exception):
    """A problem with the user's model, data or configuration.

    Messages name the offending thing (file, op, tensor, value), what was expected and, where
    there is a finite set, the valid choices.
    """

"""The one error type qcompiler raises for problems a user can fix."""

import tvm_ffi


@tvm_ffi.register_error
class QCompilerError(Exception):
    """A problem with the user's model, data or configuration.

    Messages name the offending thing (file, op, tensor, value), what was expected and, where
    there is a finite set, the valid choices.

    Registered with TVM's FFI so that one raised inside a pass callback (an expression
    mutator's visit) reaches the caller as itself, not as a ``RuntimeError``.
    """

"""The exception our argument checks raise.

torch raises RuntimeError for invalid attention arguments (``F.scaled_dot_product_attention``'s
"Expected query, key, and value to have the same dtype ..."), Python code conventionally
raises ValueError. A drop-in must satisfy callers written against either, so argument errors
are instances of both.
"""


class ArgumentError(ValueError, RuntimeError):
    """An invalid argument; the message names it, with the expected and the actual value."""

"""vLLM plugin entry point (group ``vllm.general_plugins``, name ``atom``)."""


def register() -> None:
    """Register the ``atom`` quantization method with vLLM.

    Called by vLLM in every process it starts; importing the module is the registration
    (its decorator runs once per process), so calling this again does nothing. Errors
    propagate: a plugin that fails to import must not be silently skipped.
    """
    import vllm_atom.serve.config  # noqa: F401

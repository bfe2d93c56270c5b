"""vLLM plugin entry point (group ``vllm.general_plugins``, name ``atom``)."""


def register() -> None:
    """Register the ``atom`` quantization method and the Atom INT4 KV cache attention backend
    (``--attention-backend CUSTOM``) with vLLM.

    Called by vLLM in every process it starts; importing the config module is the quantization
    registration (its decorator runs once per process) and the backend registration overwrites
    one dict entry, so calling this again changes nothing. Errors propagate: a plugin that fails
    to import must not be silently skipped.
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    import vllm_atom.serve.config  # noqa: F401

    register_backend(AttentionBackendEnum.CUSTOM, "vllm_atom.serve.attention.AtomInt4AttentionBackend")

from .select import select_backend  # noqa: F401

"""Commands of this group are added in their own change."""


def register(group) -> None:
    """Attach this module's commands to the ``obd`` group."""

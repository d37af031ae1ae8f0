"""semiseg's own errors. Every user-facing failure is one of these, and names what is at fault."""


class SemisegError(Exception):
    """Base class: a message a user can act on (the file, key or value, and what was expected)."""


class ConfigError(SemisegError, ValueError):
    """A config file, key or value is wrong."""


class DatasetError(SemisegError, ValueError):
    """A dataset file or folder is missing, unreadable or inconsistent."""


class RegistryError(SemisegError, KeyError):
    """An unknown or duplicate name in a registry."""

    def __str__(self) -> str:  # KeyError would repr() the message and add quotes
        return str(self.args[0]) if self.args else ""

"""Errors that the CLI reports as one actionable line instead of a traceback."""


class RLHFError(Exception):
    """A problem with the user's input (config, files, data) that they can fix."""


class ConfigError(RLHFError):
    pass


class DataError(RLHFError):
    pass


class RewardError(RLHFError):
    pass

"""The error types, in a leaf module that imports nothing of ours, so any layer can raise them without an
import circle (config, adapters, distributed and validation used to import each other for ConfigError).
Each is re-exported where it used to live (hf_tuner.config, hf_tuner.adapters, hf_tuner.assets, hf_tuner.data)."""


class ConfigError(ValueError):
    """A config that cannot run: the message names the field, file or value at fault."""


class PeftMethodError(ConfigError):
    """A PEFT method that cannot be built, or does not fit the model: the message says why."""


class DataError(ValueError):
    """A data file that cannot be used: the message names the file and the row."""


class AssetError(RuntimeError):
    """An asset is unknown, not fetched yet, or failed to fetch."""

"""The hf-performer version (also written into every Performer config.json as ``hf_performer_version``)."""

__version__ = "0.1.0"

"""lofi: local AI music (ACE-Step v1). The package top level imports no ML framework."""

__version__ = "0.1.0"
MODEL_VERSION = "ace-step-v1-3.5b"

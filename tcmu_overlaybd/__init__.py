"""obd: lazily-loaded container images (overlaybd / FastOCI) served through LIO/TCMU."""

__version__ = "0.1.0"

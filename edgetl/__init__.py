"""edgetl: transfer-learn a compact vision backbone and ship it to a device."""

__version__ = "0.1.0"

"""Readers and converters for weight files made by other frameworks. They know no training loop."""

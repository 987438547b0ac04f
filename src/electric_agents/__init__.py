"""Electric Agents server: durable agent entities on append-only HTTP streams."""

__version__ = "0.1.0"

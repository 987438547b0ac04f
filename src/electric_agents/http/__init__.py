"""HTTP: the ASGI application, routing, the error envelope and the stream protocol surface."""

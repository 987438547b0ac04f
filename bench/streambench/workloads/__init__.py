"""One module per benchmark workload; each exposes `async run(server, config)`."""

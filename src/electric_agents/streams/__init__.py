"""The Durable Streams engine: storage, appends, reads, forks, expiry and subscriptions."""

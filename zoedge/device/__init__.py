"""Device side: patch client and offline outbox."""

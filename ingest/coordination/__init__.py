"""Coordination: group membership, state records, compacted-topic reads, transactions, key wrapping."""

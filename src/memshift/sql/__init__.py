"""SQL kept as SQL: numbered migrations and one file of named queries."""

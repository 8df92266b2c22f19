"""The shared database: engine and fencing, schema and migrations, one module per table's owner."""

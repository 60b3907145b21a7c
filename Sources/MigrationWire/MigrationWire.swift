// MigrationWire: sources follow.

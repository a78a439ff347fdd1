"""The run trace: SQL tables, the recorder every stage writes through, and readers."""

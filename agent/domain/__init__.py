"""Pure data types shared by every stage: no I/O, no framework objects."""

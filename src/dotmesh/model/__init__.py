"""Pure data: names, objects and their canonical encodings, ref syntax. No I/O here."""

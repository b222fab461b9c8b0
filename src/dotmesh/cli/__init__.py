"""The ``dm`` command line: parsing, rendering, and the one place errors become exit codes."""

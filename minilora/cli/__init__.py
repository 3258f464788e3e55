"""The command line: ``minilora demo`` and the other commands."""

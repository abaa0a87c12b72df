"""Subcommands of the ``specdec`` CLI that need no package of their own."""

"""The `listener` command: one small module per subcommand, no logic of its own."""

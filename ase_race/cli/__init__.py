"""Command-line interface: one module per subcommand; nothing imports this package."""

"""The host subcommands of the edgeq CLI, one module each: HELP, add_arguments(parser) and run(args) -> int."""

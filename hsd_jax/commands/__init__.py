"""One module per `hsd-jax` subcommand; each defines `register(subparsers)`."""

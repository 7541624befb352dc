"""One module per subcommand: parse -> config -> load -> metric -> save -> print."""

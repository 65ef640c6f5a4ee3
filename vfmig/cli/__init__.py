"""The ``vfmig`` command line: one module per subcommand."""

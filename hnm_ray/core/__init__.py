"""What every stage and the config stand on: our errors, local-or-object-storage file operations, plug-in registries."""

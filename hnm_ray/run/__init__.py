"""A job's run: the Ray cluster it uses, its log and progress lines, the CLI plumbing every entry point shares, the
run folder (state.json, resume, object storage sync) and MLflow tracking."""

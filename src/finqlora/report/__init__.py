"""Stage 5, the report: reads the evaluation's metrics and the run's files, writes report.html
and report.md into its own folder."""

"""Stage 2, the instruction dataset: records built from the store (news impact, market cases,
financial-report Q&A), labels, templates, the optional teacher rewrite."""

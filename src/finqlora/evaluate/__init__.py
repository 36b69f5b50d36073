"""Stage 4, evaluation: base vs fine-tuned on the same prompts, metrics with intervals and
tests, public benchmarks, human rating sheets."""

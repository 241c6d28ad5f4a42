"""The project's benchmarks (``zo-bench``): run from a source checkout, not part of the ``zo_trainer`` wheel."""

"""``zo-bench``, one module a suite: ``speed``, ``memory``, ``accuracy``, ``growth``, ``scale`` (shapes in
``scale_models``), ``study`` (the RTE accuracy study: ``study_plan``, ``study_scoring``, ``study_report``), ``report``.

Shared pieces: ``common`` (paths, logging, JSON, statistics), ``environment`` (what each JSON records about the
machine), ``factories`` (models and batches), ``steppers`` (the training step the suites time, and MeZO's reference
baseline), ``worker`` (fresh-process measurements), ``plots``; ``cli`` is the command line (``zo-bench --help``).
"""

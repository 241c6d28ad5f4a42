"""The command-line programs (thin ``main`` + parser modules over the library); the library never imports them.

``zo-train`` (``train``), ``zo-replay`` (``replay``), ``zo-quantize`` (``quantize``), ``zo-run`` (``launch``), and
the shared exit-code / one-line-error handling (``errors``). ``zo-bench`` (``bench``) only finds and runs the
checkout's ``benchmarks/zo_bench`` package, which is not part of the wheel.
"""

"""kubetune's benchmark suite: ``python -m benchmarks [--quick] [--only NAME ...]``.

Each comparison runs side by side in one run and lands in ``benchmarks/RESULTS.md``:

1. ``efficiency``: tuning quality per compute against random search and plain Optuna
   (``benchmarks.efficiency``, arms in ``benchmarks.tuning``);
2. ``divergence``: compute wasted on trials that go NaN or diverge (``benchmarks.divergence``);
3. ``storage``: PostgreSQL and journal storage overhead per trial (``benchmarks.storage``);
4. ``status``: status size at up to 10,000 trials (``benchmarks.status_size``) and
   ``operator``: operator overhead on the kmock emulator (``benchmarks.operator_overhead``).

Benchmarks report; the test suite only checks that they run (``tests/test_benchmarks.py``).
"""

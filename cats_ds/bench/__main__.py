"""`python -m cats_ds.bench ...`: see cats_ds/bench/suite.py."""

from cats_ds.bench.suite import main

main()

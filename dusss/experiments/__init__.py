"""The experiment harness, apart from the library: grids of runs, the paper's tables and figures, the benchmark.

:mod:`~dusss.experiments.grid` defines the testbed grids and runs them in
parallel, resumably; :mod:`~dusss.experiments.tables` trains a grid's missing
runs one by one and turns their results files into the paper's tables,
difference tables and charts; :mod:`~dusss.experiments.figures` trains the
runs Figs. 4 and 5 compare; :mod:`~dusss.experiments.study` is the Step-2
recipe study; :mod:`~dusss.experiments.bench` the speed benchmark. Each names
its runs through the run registry :mod:`dusss.runs` and trains them with the
library (:mod:`dusss.pretrain`, :mod:`dusss.ssmis`); the library never imports
this package. The modules with a ``python -m dusss`` command keep its
``run(args, cfg)`` here (:data:`dusss.cli.COMMANDS`).
"""

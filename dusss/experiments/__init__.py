"""The experiment harness: grids of runs over rows, label shares, seeds and data sets (apart from the library).

:mod:`dusss.experiments.grid` defines the testbed grids and runs them in
parallel, resumably; :mod:`dusss.tables` turns their results files into the
paper's tables, difference tables and figures.
"""
